"""The argument of an `hf:` backend spec: `PATH[@opt,opt=val,...]`.

    hf:./gemma-2b@attn=eager,dtype=float32
    hf:./gemma-2b@attn=sdpa,dtype=bfloat16,compile
    hf:./m@padding=left,device=cpu

Options set here win over the run-wide ones (`--dtype`, `--device`, `--padding`), so one
diff can put two variants of the same checkpoint side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")
OPTIONS = {
    "attn": "attention implementation handed to transformers: eager, sdpa, flash_attention_2, ...",
    "dtype": "model dtype: " + ", ".join(DTYPES) + " (default: --dtype, else the checkpoint's)",
    "compile": "torch.compile the model; `compile=BACKEND` picks the backend (default inductor)",
    "device": "cpu, cuda, cuda:N (default: --device)",
    "padding": "left or right: where padding goes in this run (default: --padding, else right)",
    "cache": "dynamic or static: the KV cache class of --decode runs (default dynamic)",
}
USAGE = ("hf:PATH[@attn=eager|sdpa,dtype=float32|bfloat16,compile[=BACKEND],device=cpu|cuda,padding=left|right,"
         "cache=dynamic|static]")


@dataclass(frozen=True)
class HFSpec:
    path: Path
    attn: str | None = None
    dtype: str | None = None
    compile: str | None = None  # torch.compile backend; None = run eagerly
    device: str | None = None
    padding: str | None = None
    cache: str | None = None  # --decode's KV cache class; None = dynamic

    @classmethod
    def parse(cls, arg: str) -> HFSpec:
        """Split `PATH@opts`; the last '@' starts the options unless what follows is a path."""
        path, sep, opts = arg.rpartition("@")
        if not sep or "/" in opts:
            path, opts = arg, ""
        if not path:
            raise ValueError(f"no model path in {arg!r}; usage: {USAGE}")
        values: dict[str, str | None] = {}
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if key not in OPTIONS:
                raise ValueError(f"unknown hf option {key!r}; known: {', '.join(OPTIONS)}")
            if key in values:
                raise ValueError(f"hf option {key!r} given twice")
            if key != "compile" and not value.strip():
                raise ValueError(f"hf option {key!r} needs a value, e.g. {key}=...")
            values[key] = value.strip() if eq else None
        if "compile" in values:
            values["compile"] = values["compile"] or "inductor"
        spec = cls(Path(path).expanduser(), **values)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.padding not in (None, "left", "right"):
            raise ValueError(f"padding must be left or right, not {self.padding!r}")
        if self.cache not in (None, "dynamic", "static"):
            raise ValueError(f"cache must be dynamic or static, not {self.cache!r}")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path} is not a saved transformers model (no config.json there)")
