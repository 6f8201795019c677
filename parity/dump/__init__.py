"""The on-disk capture: format, writer, reader, stats dump (h5py + numpy, no torch)."""
