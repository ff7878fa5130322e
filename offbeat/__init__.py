"""offbeat: asynchronous RL post-training for language models, as services on NATS JetStream."""

__version__ = "0.1.0"
