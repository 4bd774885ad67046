import os
import sys

from trainer.cli import main

code = main()
# Gloo can abort a rank at interpreter shutdown (SIGABRT in its thread after the last step);
# flushing and leaving with os._exit avoids it and keeps the exit code meaningful.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
