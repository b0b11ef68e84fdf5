"""The model: the resident bundle a site and the aggregator train and evaluate, its fine-tuning modes, cached features, batching, and the exported model class."""
