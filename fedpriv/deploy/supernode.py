"""Flower's `flower-supernode`, polling the SuperLink more often; the agent runs it as `python -m` this module.

Its command line is Flower's own. Why the polling changes, and how, is in
`flower_compat.run_supernode_polling_often`.
"""

from fedpriv.common.flower_compat import run_supernode_polling_often

if __name__ == "__main__":
    run_supernode_polling_often()
