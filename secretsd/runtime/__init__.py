"""The running process: assembly, server and HTTP edge, workers, leadership, scheduler, metrics, logs, config."""
