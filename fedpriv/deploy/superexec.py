"""Flower's `flower-superexec`, idling at a slower poll; the agent's SuperNode starts it by that name.

Its command line is Flower's own. Why the polling changes, and how, is in
`flower_compat.run_superexec_polling_adaptively`.
"""

from fedpriv.common.flower_compat import run_superexec_polling_adaptively

if __name__ == "__main__":
    run_superexec_polling_adaptively()
