"""Flower's `flower-superexec`, asking for a task when its SuperNode says one is stored; the SuperNode starts it by that name.

Its command line is Flower's own. Why it waits on a wake instead of polling, and how, is in
`flower_compat.run_superexec_polling_adaptively`.
"""

from fedpriv.common.flower_compat import run_superexec_polling_adaptively

if __name__ == "__main__":
    run_superexec_polling_adaptively()
