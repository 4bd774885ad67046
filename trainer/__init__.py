"""Training: DeepSpeed ZeRO and FSDP2 engines over the token shards that data_tools writes."""
