"""fedpriv: federated, differentially private fine-tuning of text classifiers.

One import root for every part: `fedpriv.common` (what the roles share),
`fedpriv.client` (the site), `fedpriv.server` (the aggregator),
`fedpriv.simulation` (many sites on one machine), `fedpriv.audit` (the
auditor) and `fedpriv.deploy` (operator tooling). This module itself is the
`fedpriv` command's home and imports nothing heavy.
"""

__version__ = "0.1.0"
