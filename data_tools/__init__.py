"""dstrain data tools: raw corpora → cleaned, deduplicated, tokenized webdataset shards.

`data_tools.manifest` (the shard contract the trainer reads) imports only the standard library
and numpy; everything heavy lives in the pipeline modules.
"""
