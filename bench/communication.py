"""(c) Communication: bytes one site sends per round / bytes of the full model.

What travels is the federated state (trainable weights + the fixed feature
centre) serialised in a Flower ArrayRecord; the full model is every weight
and buffer of the classifier, as exported.

    python bench/communication.py
"""

from __future__ import annotations

from _util import save, table

from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet
from fedpriv.common.model.bundle import build_model
from fedpriv.common.wire.protocol import to_record


def main() -> None:
    config = FedprivConfig()
    labels = LabelSet.load(config.data.labels)
    rows, results = [], {}
    for mode in ("head", "lora", "full"):
        bundle = build_model(config.replace(**{"model.mode": mode}), labels)
        record = to_record(bundle.get_state())
        sent = sum(len(array.data) for array in record.values())
        model = sum(t.numel() * t.element_size() for t in bundle.model.state_dict().values())
        results[mode] = {"bytes-per-update": sent, "model-bytes": model, "ratio": sent / model}
        rows.append([mode, sent, model, f"{100 * sent / model:.3f}%"])
    table("Bytes per site per round (MiniLM)", ["mode", "update bytes", "model bytes", "update / model"], rows)
    save("communication", {"results": results}, "python bench/communication.py")


if __name__ == "__main__":
    main()
