"""What runs inside a job: the TaskRunner, the shared Trainer loop, checkpoints and output sinks."""
