"""The aggregator's step of distributed DP-SGD: the unmasked noisy gradient sum, divided by a public
constant, applied to the global model by SGD with momentum or Adam (post-processing: free under DP).

The optimizer is torch's, over the trainable arrays of the global model; its
state travels in the round checkpoint so a resumed run continues the same
trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedpriv.common.config import FedprivConfig
from fedpriv.common.privacy.plan import plan_for

PREFIX = "server-optimizer"


class ServerOptimizer:
    def __init__(self, config: FedprivConfig, names: list[str]):
        plan = plan_for(config)
        name, learning_rate = plan.optimizer, plan.learning_rate
        self.names = list(names)
        self._params: list[torch.Tensor] | None = None
        self._make = lambda params: _optimizer(name, params, learning_rate, config)
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, np.ndarray] = {}

    def step(
        self, state: Mapping[str, np.ndarray], gradient: Mapping[str, np.ndarray], normaliser: float
    ) -> dict[str, np.ndarray]:
        """The global model after one step along -gradient / normaliser (other arrays unchanged)."""
        if self._optimizer is None:
            self._params = [
                torch.nn.Parameter(torch.as_tensor(np.array(state[n], dtype=np.float32))) for n in self.names
            ]
            self._optimizer = self._make(self._params)
            if self._pending:
                self._load(self._pending)
        assert self._params is not None
        with torch.no_grad():
            for param, name in zip(self._params, self.names, strict=True):
                param.copy_(torch.as_tensor(np.asarray(state[name], dtype=np.float32)))
                param.grad = torch.as_tensor(np.asarray(gradient[name], dtype=np.float32) / normaliser)
        self._optimizer.step()
        updated = dict(state)
        for param, name in zip(self._params, self.names, strict=True):
            updated[name] = param.detach().numpy().astype(state[name].dtype, copy=True)
        return updated

    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state as flat arrays, for the checkpoint."""
        if self._optimizer is None:
            return dict(self._pending)
        flat = {}
        for index, values in self._optimizer.state_dict()["state"].items():
            for key, value in values.items():
                flat[f"{PREFIX}/{index}/{key}"] = np.asarray(torch.as_tensor(value).numpy())
        return flat

    def restore(self, flat: Mapping[str, np.ndarray]) -> None:
        pending = {k: v for k, v in flat.items() if k.startswith(PREFIX + "/")}
        if self._optimizer is None:
            self._pending = pending
        else:
            self._load(pending)

    def _load(self, flat: Mapping[str, np.ndarray]) -> None:
        assert self._optimizer is not None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = torch.as_tensor(np.asarray(value))
        saved = self._optimizer.state_dict()
        self._optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _optimizer(name: str, params, learning_rate: float, config: FedprivConfig) -> torch.optim.Optimizer:
    t = config.train
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=t.weight_decay)
