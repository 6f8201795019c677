"""Comparing two runs: the pair check, the breakdown, the verdict rule, the comparers, isolation."""
