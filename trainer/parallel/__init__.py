"""Parallelism beyond plain data parallel for the FSDP2 engine: the device mesh (mesh) and tensor +
sequence parallel plans (tensor)."""
