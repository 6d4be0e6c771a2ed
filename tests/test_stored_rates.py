"""No stored rate is above the limit of the machine that printed it (issue 16).

The rule, as this test reads it:

1. A **rate** is a number followed by ``tokens/s`` in a stored output (a stream, or a value's text).
2. In ``notebooks/*.ipynb`` every rate carries its **share of a limit** right after it, ``(x% of ...)``, as
   ``helpers.measure.rate_text`` prints it, and x is at most 100%. What stands inside that parenthesis (the
   limit itself, the spread of the repeats) is not another rate.
3. In ``gpu-reference/*/results.json`` every record with a limit has ``tokens_per_s <= limit_tokens_per_s``, and
   so has every record as ``helpers.reference.records`` reads it (it adds a limit where a file recorded none).
4. In ``gpu-reference/*/*.ipynb`` (GPU copies executed before the rule) a rate with a share obeys rule 2; a rate
   without one must be a figure of a results file (the same value at the precision printed) within that
   record's limit, or be listed in :data:`KNOWN_EXCEPTIONS` with the reason.
5. In every committed speed benchmark (``cpu-reference/speed/speed.json``, ``gpu-reference/*/speed/speed.json``,
   written by ``tools/bench.py``) every record has ``tokens_per_s <= limit_tokens_per_s``, at least 3 repeats and
   the spread of its repeats, which brackets its median.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers.measure import compare_rates, rate_text
from helpers.reference import TIERS, read_reference, records, same_configuration, speed_results

ROOT = Path(__file__).resolve().parent.parent

RATE = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?) tokens/s")
"""A number, then "tokens/s": 12.3, 1,093 or 1.09e+03 (rate_text's short form)."""

SHARE = re.compile(r"\s*\((\d+(?:\.\d+)?)% of [^)]*\)")
"""A share of a limit right after a rate: "(4.5% of the limit, 273 tokens/s, repeats 11 to 13)"."""

KNOWN_EXCEPTIONS = {
    # GPU copies executed before every rate carried its limit; the one-GPU issue remakes them. Each prints a
    # rate this notebook measured itself on the GPU, whose limit it did not record (no results.json holds it).
    ("one-gpu", "01", 31): "fp32 and NF4 tokens/s timed in the notebook on the H200, no limit printed",
    ("one-gpu", "02", 44): "disk-offload tokens/s timed in the notebook on the H200, no limit printed",
    ("one-gpu", "06", 31): "split and single-device tokens/s per sequence timed in the notebook, no limit printed",
    ("two-gpu", "02", 42): "disk-offload tokens/s timed in the notebook on two H200, no limit printed",
    ("two-gpu", "06", 27): "split and single-device tokens/s per sequence timed in the notebook, no limit printed",
    ("two-gpu", "06", 51): "prints the bandwidth limit itself (1954 tokens/s at 4.3 TB/s) beside a rate with its "
                           "share, in the older '= x% of' form",
}
"""(tier, notebook number, cell index) -> why its rates without a share are not checked against a limit."""


def number(text: str) -> float:
    return float(text.replace(",", ""))


def rate_faults(text: str) -> tuple[list[str], list[float]]:
    """Check the rates of one output: ``(faults, rates without a share)``.

    A fault is a share above 100%; a rate without a share is returned for the caller to judge (rule 2 makes it a
    fault in ``notebooks/``; rule 4 looks it up in the results files).
    """
    text = " ".join(text.split())  # wrapped lines read as one
    faults, bare, skip_until = [], [], 0
    for m in RATE.finditer(text):
        if m.start() < skip_until:
            continue  # inside a share's parenthesis: the limit, not a rate
        share = SHARE.match(text, m.end())
        if share is None:
            bare.append(number(m.group(1)))
            continue
        skip_until = share.end()
        if float(share.group(1)) > 100:
            faults.append(f"{m.group(0)} is {share.group(1)}% of its limit")
    return faults, bare


def outputs(path: Path) -> list[tuple[int, str]]:
    """(cell index, text) of every stored stream and text value of a notebook."""
    out = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        for o in cell.get("outputs", []):
            text = o.get("text") or o.get("data", {}).get("text/plain", "")
            out.append((i, "".join(text) if isinstance(text, list) else text))
    return out


def results_files() -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(ROOT.glob("gpu-reference/*/results.json"))}


def record_faults(recs: list[dict]) -> list[str]:
    """Records whose tokens/s is above their limit (records without a limit are not judged here)."""
    return [f"{r['path']} {r['format']} batch {r['batch']}: {r['tokens_per_s']:.4g} tokens/s above its limit "
            f"{r['limit_tokens_per_s']:.4g}" for r in recs
            if r.get("limit_tokens_per_s") is not None and r["tokens_per_s"] > r["limit_tokens_per_s"]]


# --- the rule, on planted outputs -------------------------------------------------------------------------------

def test_a_rate_with_its_share_passes_and_its_limit_is_not_read_as_a_rate():
    assert rate_faults(rate_text(12.3, 273, (11.0, 13.0))) == ([], [])
    assert rate_faults("batch 16: 1.09e+03 tokens/s (2.9% of the limit,\n   3.712e+04 tokens/s)") == ([], [])


def test_the_impossible_rate_of_issue_16_is_caught():
    faults, bare = rate_faults("single: 7000000000.0 tokens/s per sequence; split / single: 0.00")
    assert bare == [7e9] and not faults  # no share: a fault in notebooks/, looked up for the GPU copies


def test_a_share_above_100_percent_is_a_fault():
    faults, _ = rate_faults("9000 tokens/s (120.0% of the limit, 7500 tokens/s)")
    assert faults == ["9000 tokens/s is 120.0% of its limit"]


def test_a_planted_notebook_fails_the_notebook_rule(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": "", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": ["ok: 5 tokens/s (1.0% of the limit, 500 tokens/s)\n"]},
        {"output_type": "stream", "name": "stdout", "text": ["single: 7000000000.0 tokens/s per sequence\n"]}]}]}
    (tmp_path / "99_planted.ipynb").write_text(json.dumps(nb))
    assert notebook_faults(tmp_path / "99_planted.ipynb") == ["cell 0: 7e+09 tokens/s has no share of a limit"]


def test_a_planted_record_above_its_limit_is_a_fault():
    good = {"path": "one GPU", "format": "bf16", "batch": 1, "tokens_per_s": 50.0, "limit_tokens_per_s": 2000.0}
    bad = {**good, "batch": 16, "tokens_per_s": 7e9}
    assert record_faults([good, bad]) == ["one GPU bf16 batch 16: 7e+09 tokens/s above its limit 2000"]


def test_rate_text_refuses_a_rate_above_its_limit():
    with pytest.raises(RuntimeError, match="above this machine's limit"):
        rate_text(7e9, 120.0)


def test_a_comparison_states_its_spread_and_calls_an_overlap_no_difference():
    no_spread = compare_rates({"tokens_per_s": 62.1}, {"tokens_per_s": 68.9}, "replica", "one GPU")
    assert "0.90x" in no_spread and "no difference can be claimed" in no_spread
    overlap = compare_rates({"tokens_per_s": 9.3, "spread": (8.0, 11.0)}, {"tokens_per_s": 10.0, "spread": (9.0, 12.0)},
                            "a", "b")
    assert overlap.startswith("a / b: repeats 0.67x to 1.22x") and overlap.endswith("no measurable difference")
    slower = compare_rates({"tokens_per_s": 1.0, "spread": (0.9, 1.1)}, {"tokens_per_s": 26.0, "spread": (25.0, 27.0)},
                           "split", "single")
    assert slower.endswith("split is slower") and "median 0.038x" in slower


def test_without_spreads_a_ratio_is_judged_by_the_noise_bound_and_names_it():
    """Figures without recorded repeats: a ratio outside [1/bound, bound] is a difference, one inside is not."""
    one, bound = {"tokens_per_s": 43.8, "noise_bound": 1.9}, 1.9
    offload = compare_rates({"tokens_per_s": 3.35, "noise_bound": bound}, one, "16 layers on the CPU", "none")
    assert offload == ("16 layers on the CPU / none: 0.076x, beyond the 1.90x two runs of the same configuration "
                       "differed by (no spread of repeats recorded): 16 layers on the CPU is slower")
    inside = compare_rates({"tokens_per_s": 43.2, "noise_bound": bound}, {"tokens_per_s": 69.7, "noise_bound": bound},
                           "split", "one GPU")
    assert inside == ("split / one GPU: 0.62x, within the 1.90x two runs of the same configuration differed by: "
                      "no difference can be claimed")
    faster = compare_rates({"tokens_per_s": 3576.0, "noise_bound": bound}, {"tokens_per_s": 68.9},
                           "batch 64", "batch 1")
    assert faster.endswith("batch 64 is faster") and "1.90x" in faster  # one record with the bound is enough
    at_the_edge = compare_rates({"tokens_per_s": 19.0, "noise_bound": bound}, {"tokens_per_s": 10.0}, "a", "b")
    assert at_the_edge.endswith("no difference can be claimed")  # the bound itself is still noise


def test_the_noise_bound_is_the_largest_gap_between_runs_of_the_same_configuration():
    def rec(path, tps, batch=1, gpus=1, **extra):
        return {"shape": "llama-1b", "format": "bf16", "path": path, "batch": batch, "gpus": gpus,
                "tokens_per_s": tps, **extra}

    h200 = {"gpus": [["NVIDIA H200", 139.8]]}
    files = {"one-gpu": {"hardware": h200, "records": [
                 rec("one GPU", 60.0), rec("replicas", 50.0), rec("cpu offload", 45.0, layers_on_cpu=0),
                 rec("cpu offload", 9.0, layers_on_cpu=4), rec("one GPU", 500.0, batch=16)]},
             "two-gpu": {"hardware": {"gpus": h200["gpus"] * 2}, "records": [
                 rec("one GPU", 90.0), rec("split", 40.0, gpus=2), rec("replicas", 61.0, gpus=2),
                 rec("cpu offload", 13.5, layers_on_cpu=4)]}}
    noise = same_configuration(files)
    # the model whole on one GPU at batch 1: 45 (no layer offloaded) to 90; a split or two replicas are not it
    assert noise["bound"] == 2.0 and noise["configurations"][0]["configuration"] == "one GPU, bf16, batch 1"
    assert [len(c["figures"]) for c in noise["configurations"]] == [4, 2]
    assert noise["configurations"][1]["configuration"] == "cpu offload, 4 layers on the CPU, bf16, batch 1"
    other_gpu = {"hardware": {"gpus": [["NVIDIA H100 80GB HBM3", 79.2]]}, "records": [rec("one GPU", 200.0)]}
    assert same_configuration({"a": files["one-gpu"], "h100": other_gpu})["bound"] == 60.0 / 45.0
    assert same_configuration({"h100": other_gpu})["bound"] is None


def test_read_reference_gives_figures_without_a_spread_the_bound_of_the_committed_files(capsys):
    files = read_reference(0)
    noise = files["one-gpu"]["noise"]
    assert noise is files["two-gpu"]["noise"] and round(noise["bound"], 2) == 1.90
    top = noise["configurations"][0]
    assert top["configuration"] == "one GPU, bf16, batch 16" and {t for t, _ in top["figures"]} == set(TIERS)
    assert all(r["noise_bound"] == noise["bound"]
               for res in files.values() for r in res["records"] if not r.get("spread"))
    assert "differed by up to 1.90x" in capsys.readouterr().out
    assert read_reference(2)["two-gpu"]["noise"]["bound"] == noise["bound"]  # from every file, not only those read


# --- the rule, on what is stored ---------------------------------------------------------------------------------

def notebook_faults(path: Path) -> list[str]:
    """Rule 2 for one notebook of ``notebooks/``."""
    out = []
    for i, text in outputs(path):
        faults, bare = rate_faults(text)
        out += [f"cell {i}: {f}" for f in faults]
        out += [f"cell {i}: {v:.4g} tokens/s has no share of a limit" for v in bare]
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name[:2])
def test_every_rate_in_the_notebooks_carries_its_share_of_a_limit(path):
    faults = notebook_faults(path)
    assert not faults, (f"{path.name}: print every tokens/s with helpers.measure.rate_text (or a reference record's "
                        "'rate') beside its limit, then regenerate the outputs:\n" + "\n".join(faults))


@pytest.mark.parametrize("tier", sorted(results_files()))
def test_every_reference_record_is_within_its_limit(tier):
    res = results_files()[tier]
    assert not record_faults(res.get("records", [])), record_faults(res["records"])
    read = records(res)
    assert all(r["limit_tokens_per_s"] for r in read), "helpers.reference.records left a record without a limit"
    assert not record_faults(read), record_faults(read)


def matches_a_record(value: str, recs: list[dict]) -> dict | None:
    """A record whose tokens/s (total or per sequence) prints as ``value`` at its precision, or None."""
    decimals = len(value.split(".")[1]) if "." in value else 0
    for r in recs:
        for key in ("tokens_per_s", "tokens_per_s_per_sequence"):
            if key in r and abs(r[key] - number(value)) <= 0.5 * 10 ** -decimals + 1e-9:
                return r
    return None


@pytest.mark.parametrize("path", sorted(ROOT.glob("gpu-reference/*/[0-9][0-9]_*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.name[:2]}")
def test_every_rate_in_the_gpu_copies_is_within_a_limit_or_a_known_exception(path):
    recs = [r for res in results_files().values() for r in records(res)]
    tier, nb, faults = path.parent.name, path.name[:2], []
    for i, text in outputs(path):
        found, _ = rate_faults(text)
        faults += [f"cell {i}: {f}" for f in found]
        if (tier, nb, i) in KNOWN_EXCEPTIONS:
            continue
        flat = " ".join(text.split())
        spans = [m.span() for m in SHARE.finditer(flat)]
        for m in RATE.finditer(flat):
            if any(a <= m.start() < b for a, b in spans) or SHARE.match(flat, m.end()):
                continue  # a limit inside a share, or a rate with its share: rule 2 judged it
            r = matches_a_record(m.group(1), recs)
            if r is None:
                faults.append(f"cell {i}: {m.group(0)} is no figure of a results.json: list it in KNOWN_EXCEPTIONS")
            elif r["tokens_per_s"] > r["limit_tokens_per_s"]:
                faults.append(f"cell {i}: {m.group(0)} is above its record's limit {r['limit_tokens_per_s']:.4g}")
    assert not faults, f"{tier}/{path.name}:\n" + "\n".join(faults)


def test_every_known_exception_still_exists():
    """An exception whose cell no longer prints a rate is stale: remove it."""
    for (tier, nb, cell), why in KNOWN_EXCEPTIONS.items():
        path = next(ROOT.glob(f"gpu-reference/{tier}/{nb}_*.ipynb"))
        texts = [t for i, t in outputs(path) if i == cell]
        assert any(RATE.search(" ".join(t.split())) for t in texts), f"{tier} {nb} cell {cell} ({why}) prints no rate"


# --- rule 5: the committed speed benchmarks ---------------------------------------------------------------------

def speed_files() -> list[Path]:
    return sorted([*ROOT.glob("cpu-reference/speed/speed.json"), *ROOT.glob("gpu-reference/*/speed/speed.json")])


def speed_record_faults(recs: list[dict]) -> list[str]:
    """Rule 5 for the records of one speed.json: within the limit, 3 repeats or more, a spread that brackets the
    median."""
    faults = record_faults(recs)
    for r in recs:
        name = f"{r['shape']} {r['path']} {r['format']} batch {r['batch']}"
        if r.get("limit_tokens_per_s") is None:
            faults.append(f"{name}: no limit_tokens_per_s")
        if (r.get("repeats") or 0) < 3:
            faults.append(f"{name}: {r.get('repeats')} repeats, fewer than 3")
        spread = r.get("spread")
        if not spread or len(spread) != 2:
            faults.append(f"{name}: no spread of repeats")
        elif not spread[0] <= r["tokens_per_s"] <= spread[1]:
            faults.append(f"{name}: median {r['tokens_per_s']:.4g} tokens/s outside its spread {spread[0]:.4g} to "
                          f"{spread[1]:.4g}")
    return faults


def test_a_planted_benchmark_record_without_a_spread_or_outside_it_is_a_fault():
    good = {"shape": "s", "path": "eager", "format": "bf16", "batch": 1, "tokens_per_s": 20.0,
            "limit_tokens_per_s": 120.0, "spread": [19.0, 21.0], "repeats": 3}
    assert speed_record_faults([good]) == []
    assert speed_record_faults([{**good, "spread": None}]) == ["s eager bf16 batch 1: no spread of repeats"]
    assert speed_record_faults([{**good, "spread": [21.0, 25.0]}]) == [
        "s eager bf16 batch 1: median 20 tokens/s outside its spread 21 to 25"]
    assert speed_record_faults([{**good, "tokens_per_s": 130.0, "spread": [125.0, 131.0]}]) == [
        "eager bf16 batch 1: 130 tokens/s above its limit 120"]
    assert speed_record_faults([{**good, "repeats": 2}]) == ["s eager bf16 batch 1: 2 repeats, fewer than 3"]


@pytest.mark.parametrize("path", speed_files(), ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_every_benchmark_record_is_within_its_limit_with_the_spread_of_its_repeats(path):
    res = json.loads(path.read_text())
    assert res["records"], f"{path.relative_to(ROOT)} holds no records"
    faults = speed_record_faults(res["records"])
    assert not faults, f"{path.relative_to(ROOT)} (tools/bench.py wrote it; measure again):\n" + "\n".join(faults)


def test_speed_results_reads_each_committed_benchmark_and_none_where_there_is_none():
    for tier, folder in (("cpu", "cpu-reference/speed"), ("one-gpu", "gpu-reference/one-gpu/speed")):
        path = ROOT / folder / "speed.json"
        assert speed_results(tier) == (json.loads(path.read_text()) if path.is_file() else None)
    assert ROOT / "cpu-reference/speed/speed.json" in speed_files(), "the CPU tier's benchmark is committed"
    with pytest.raises(ValueError, match="cpu, one-gpu"):
        speed_results("two-cpu")
