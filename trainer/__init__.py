"""Training: DeepSpeed ZeRO and FSDP2 engines over the token shards that data_tools writes."""

import logging

# transformers imports torchao whenever it is installed; on a machine without CUDA its GPU kernel
# libraries fail to load and torch warns about its enum registrations, once per process and rank.
# Neither changes what a run does, so they do not belong in a run's log.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
