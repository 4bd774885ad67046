"""Parallelism beyond plain data parallel for the FSDP2 engine: the device mesh (mesh), tensor +
sequence parallel plans (tensor) and pipeline stages with their schedules (pipeline)."""
