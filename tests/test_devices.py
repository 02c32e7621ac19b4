"""The `device` key shared by generate and evaluate: auto, a valid name, and one-line errors naming the key."""

import pytest
import torch

from halfbody.utils.devices import device_from
from halfbody.utils.errors import UserError


def test_device_key():
    assert device_from({}) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device_from({"device": "cpu"}) == torch.device("cpu")
    with pytest.raises(UserError, match=r"^device='gpu0': expected auto, cpu, cuda or cuda:N$"):
        device_from({"device": "gpu0"})
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^device='cuda:1': no CUDA device is available"):
            device_from({"device": "cuda:1"})
