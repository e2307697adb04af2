"""The GPTQ Hessian cache on disk: a corrupt file reads as absent, moved aside, never raised."""

from __future__ import annotations

import torch

from ptqscale.methods.hessian_cache import HessianCache


def test_corrupt_hessian_and_groups_files_are_moved_aside(tmp_path, caplog):
    cache = HessianCache.open(str(tmp_path), {"model": "ab12", "calib": "cd34"})
    H = torch.eye(4)
    cache.save("layers.0.q", H, 8)
    cache.save_groups([["q", "k"]])
    got, tokens = cache.load("layers.0.q")
    assert torch.equal(got, H) and tokens == 8 and cache.groups() == [["q", "k"]]
    folder = tmp_path / "gptq-hessians" / cache.key
    layer = folder / "layers.0.q.safetensors"
    layer.write_bytes(layer.read_bytes()[:20])
    (folder / "groups.json").write_text('[["q", ')
    with caplog.at_level("WARNING", "ptqscale"):
        assert cache.load("layers.0.q") is None and cache.groups() is None
    for name in ("layers.0.q.safetensors", "groups.json"):
        assert str(folder / name) in caplog.text
        assert len(list(folder.glob(f"{name}.corrupt-*"))) == 1
    assert not cache.has("layers.0.q")          # recomputed by the next job, then read again
    cache.save("layers.0.q", H, 8)
    assert torch.equal(cache.load("layers.0.q")[0], H)
