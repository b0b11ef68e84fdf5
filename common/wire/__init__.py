"""What crosses the wire between sites and the aggregator: the message protocol, the secure-aggregation stages and their cryptography (secagg)."""
