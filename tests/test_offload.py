"""Tests of helpers.offload: what a token costs with part of the model on the CPU or the disk (notebook 05)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers.offload import disk_read_rate, host_to_device_rate, offload_seconds_per_token


def test_every_offloaded_byte_crosses_once_per_token():
    r = offload_seconds_per_token(4e9, cpu_bytes=2e9, disk_bytes=1e9, gpu_bandwidth=2e12, h2d_rate=5e9,
                                  disk_rate=1e9)
    assert r["gpu_s"] == pytest.approx(4e9 / 2e12)
    assert r["h2d_s"] == pytest.approx(3e9 / 5e9)  # the disk's bytes cross too
    assert r["disk_s"] == pytest.approx(1.0) and r["cpu_s"] == 0
    assert r["seconds_per_token"] == pytest.approx(r["gpu_s"] + r["h2d_s"] + r["disk_s"])
    assert r["tokens_per_s"] == pytest.approx(1 / r["seconds_per_token"])
    assert "5 GB/s" in r["assumptions"] and "copied to the GPU for every token" in r["assumptions"]
    cached = offload_seconds_per_token(4e9, cpu_bytes=2e9, disk_bytes=1e9, gpu_bandwidth=2e12, h2d_rate=5e9,
                                       disk_cached=True)
    assert cached["disk_s"] == 0 and "page cache" in cached["assumptions"]


def test_computing_offloaded_layers_on_the_cpu_reads_them_at_its_bandwidth():
    r = offload_seconds_per_token(4e9, cpu_bytes=2e9, gpu_bandwidth=2e12, cpu_compute=True, cpu_bandwidth=4e10)
    assert r["h2d_s"] == 0 and r["cpu_s"] == pytest.approx(2e9 / 4e10)
    assert "read by the CPU where they sit" in r["assumptions"]


def test_a_missing_rate_is_refused_by_name():
    with pytest.raises(ValueError, match="h2d_rate"):
        offload_seconds_per_token(1e9, cpu_bytes=1e9, gpu_bandwidth=1e12)
    with pytest.raises(ValueError, match="disk_rate"):
        offload_seconds_per_token(1e9, disk_bytes=1e9, gpu_bandwidth=1e12, h2d_rate=1e10)
    with pytest.raises(ValueError, match="cpu_bandwidth"):
        offload_seconds_per_token(1e9, cpu_bytes=1e9, gpu_bandwidth=1e12, cpu_compute=True)
    with pytest.raises(ValueError, match="cpu_bytes"):
        offload_seconds_per_token(1e9, cpu_bytes=-1, gpu_bandwidth=1e12)
    # nothing offloaded: the host-to-device rate is not needed
    assert offload_seconds_per_token(1e9, gpu_bandwidth=1e12)["h2d_s"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_host_to_device_rate_refuses_without_a_gpu():
    with pytest.raises(RuntimeError, match="reference_results"):
        host_to_device_rate(pinned=True)


def test_disk_read_rate_cleans_up_after_itself(tmp_path):
    (tmp_path / "mine.txt").write_text("kept")
    r = disk_read_rate(tmp_path, mib=64, repeats=1)
    assert r["read_Bps"] > 0 and r["write_Bps"] > 0 and r["folder"] == str(tmp_path)
    assert r["evicted"] == hasattr(os, "posix_fadvise") or not r["evicted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # only its own file, deleted
    with pytest.raises(FileNotFoundError, match="existing folder"):
        disk_read_rate(tmp_path / "absent")
    with pytest.raises(ValueError, match="64 MiB"):
        disk_read_rate(tmp_path, mib=1)


def test_allocation_peak_counts_the_transient():
    from helpers.measure import allocation_peak

    def make():
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 4 MB more while both live
        return float(b[0])

    out, peak = allocation_peak(make)
    assert out == 2.0 and 8_000_000 <= peak < 8_500_000
