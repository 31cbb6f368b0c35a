"""kvzap_trt/eval: task generators (deterministic, answers that the prompt really holds, exact
scoring), baselines at their target compression, and the report on a tiny random model.

The generators are checked against answers recomputed here from the prompt text alone (regexes
and counts), not against what the generator says it hid.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from kvzap_trt.cli import main
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.eval.baselines import RandomEviction, WindowOnly, leave_rates, matched_window
from kvzap_trt.eval.haystack import NOISE
from kvzap_trt.eval.report import main as report_main
from kvzap_trt.eval.report import paired_summary, write_report
from kvzap_trt.eval.runner import Method, run_method, summarise
from kvzap_trt.eval.sample import score
from kvzap_trt.eval.suite import evaluate
from kvzap_trt.eval.tasks import TASKS, make_samples
from kvzap_trt.eval.tasks import depth as needle_depth
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.surrogate import random_surrogate


def words(text: str) -> int:
    return len(text.split())


LENGTH = 250  # words: every task fills it (cwe's 145-word list holds ~310 words once each)


@pytest.mark.parametrize("task", list(TASKS))
def test_generators_are_deterministic_per_seed_and_fill_their_length(task):
    a = make_samples(task, LENGTH, 3, seed=7, count=words)
    b = make_samples(task, LENGTH, 3, seed=7, count=words)
    c = make_samples(task, LENGTH, 3, seed=8, count=words)
    fields = lambda xs: [(s.context, s.question, s.answer_prefix, s.answers) for s in xs]  # noqa: E731
    assert fields(a) == fields(b)
    assert all(x.context != y.context and x.answers != y.answers for x, y in zip(a, c))
    assert len({s.context for s in a}) == 3  # samples of one seed differ from each other
    for s in a:
        assert 0.85 * LENGTH <= words(s.user_turn) <= LENGTH
        assert s.question not in s.context
    # a sample does not depend on how many others are drawn beside it
    assert make_samples(task, LENGTH, 1, seed=7, count=words)[0].context == a[0].context


NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@pytest.mark.parametrize("task,keys,values", [("niah_single_noise", 1, 1), ("niah_single_text", 1, 1),
                                              ("niah_multikey_text", 4, 1), ("niah_multivalue_noise", 1, 4)])
def test_needle_answers_are_the_asked_keys_values(task, keys, values):
    for s in make_samples(task, LENGTH, 4, seed=1, count=words):
        found = NEEDLE.findall(s.context)
        assert len({k for k, _ in found}) == keys and len(found) == keys - 1 + values
        (query,) = re.findall(r"special magic numbers? for (\S+) mentioned", s.question)
        assert sorted(v for k, v in found if k == query) == sorted(s.answers)
        assert query in s.answer_prefix
        assert score(s.answer_prefix + " " + ", ".join(s.answers) + ".", s.answers) == 1.0


def test_noise_needle_sits_at_its_depth():
    for s in make_samples("niah_single_noise", 1000, 5, seed=3, count=words):
        body = s.context.split("\n")[1]  # intro \n haystack \n question
        (needle,) = s.meta["needles"]
        depth = body.index(needle) / (len(body) - len(needle))
        assert depth == pytest.approx(s.meta["depths"][0], abs=len(NOISE) / len(body) + 1e-9)
        assert s.meta["depths"][0] == needle_depth(s.index)
    first = sorted(needle_depth(i) for i in range(6))  # any first few samples cover the context
    assert max(b - a for a, b in zip([0.0] + first, first + [1.0])) < 0.3


def test_variable_tracking_answer_is_every_variable_holding_the_value():
    for s in make_samples("vt", LENGTH, 4, seed=2, count=words):
        direct = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+)\.", s.context))
        links = re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", s.context)
        (value,) = re.findall(r"assigned the value (\d+) in the text", s.question)
        holding = {v for v, x in direct.items() if x == value}
        for _ in links:  # follow the chain to a fixed point, in any order
            holding |= {b for b, a in links if a in holding}
        assert sorted(holding) == sorted(s.answers) and len(holding) == 5


def test_common_words_are_the_most_frequent_in_the_list():
    for length in (LENGTH, 1100):
        for s in make_samples("cwe", length, 3, seed=4, count=words):
            counts = Counter(re.findall(r"^\d+\. (\w+)$", s.context, re.MULTILINE))
            top = {w for w, _ in counts.most_common(5)}
            assert top == set(s.answers)
            assert min(counts[w] for w in top) == 3 * max(c for w, c in counts.items() if w not in top)


def test_qa_answer_is_the_asked_persons_town():
    for s in make_samples("qa", LENGTH, 4, seed=5, count=words):
        bios = dict(re.findall(r"^(\w+ \w+) was born in \d+ in the town of (\w+),", s.context, re.MULTILINE))
        (name,) = re.findall(r"In which town was (\w+ \w+) born\?", s.question)
        assert len(bios) == 4 and [bios[name]] == s.answers
        wrong = next(t for n, t in bios.items() if n != name)
        assert score(wrong, s.answers) == 0.0


def test_scorer_is_exact():
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score(" 1234568.", ["1234567"]) == 0.0
    assert score("12345678", ["1234567"]) == 0.0  # a longer number is not the answer
    assert score("The party is over", ["art"]) == 0.0  # whole words only
    assert score("Lucky, JOLLY and canyon", ["lucky", "jolly", "statue", "canyon"]) == 0.75
    with pytest.raises(ValueError):
        score("anything", [])


def test_bad_task_requests_are_clear_errors():
    with pytest.raises(KvzapError, match="unknown task 'nope'"):
        make_samples("nope", 500, 1, 0, words)
    with pytest.raises(KvzapError, match="cannot hold even"):
        make_samples("niah_single_noise", 20, 1, 0, words)
    with pytest.raises(KvzapError, match=">= 1"):
        make_samples("qa", 500, 0, 0, words)


def test_random_eviction_scores_hit_their_rate_per_head():
    rates = torch.tensor([[0.0, 0.3, 1.0], [0.5, 0.9, 0.1]])
    r = RandomEviction(rates, seed=0)
    for layer in range(2):
        s = r.score(layer, torch.zeros(20000, 8))
        assert s.shape == (20000, 3)
        assert torch.allclose((s < 0).float().mean(0), rates[layer], atol=0.015)
    assert (WindowOnly(3).score(0, torch.zeros(5, 8)) < -1e30).all()
    with pytest.raises(ValueError):
        RandomEviction(torch.tensor([[1.5]]))


def test_leave_rates_and_matched_window_from_kv_reports():
    # 2 layers x 2 heads; 100 and 60 tokens, window 20: 80 and 40 pairs left the window per head
    kvs = [{"tokens": 100, "kept": [[20, 60], [100, 20]]}, {"tokens": 60, "kept": [[20, 40], [60, 20]]}]
    rates = leave_rates(kvs, window=20)
    assert torch.allclose(rates, torch.tensor([[1.0, 60 / 120], [0.0, 1.0]]))
    assert matched_window(kvs) == round(((20 + 60 + 100 + 20) / 4 + (20 + 40 + 60 + 20) / 4) / 2)


# -- the runner and the report on a tiny random model (byte-level "tokenizer") -----------------

VOCAB = 160


def ids(sample) -> tuple[list[int], list[int]]:
    """(context, question + answer prefix) as bytes modulo the tiny vocabulary."""
    return ([b % VOCAB for b in (sample.context + "\n").encode()],
            [b % VOCAB for b in (sample.question + "\n" + sample.answer_prefix).encode()])


def text(token_ids: list[int]) -> str:
    return " ".join(map(str, token_ids))


def count(t: str) -> int:
    return len(t.encode()) + 60


@pytest.fixture(scope="module")
def tiny_rt(tiny_dirs):
    return Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=32))


def test_baselines_hit_the_compression_of_their_kvzap_run(tiny_rt):
    samples = make_samples("niah_single_noise", 700, 3, seed=0, count=count)
    heads = tiny_rt.loaded.config.num_kv_heads
    full = run_method(tiny_rt, Method("full", None, 0.0, 32), samples, ids, text)
    assert summarise(full)["compression"] == 0.0
    surrogate = random_surrogate("linear", 3, 64, heads, seed=1)
    kv_recs = run_method(tiny_rt, Method("kvzap", surrogate, 0.0, 32, "rand"), samples, ids, text)
    c = summarise(kv_recs)["compression"]
    assert 0.2 < c < 0.8  # this tau evicts something and keeps something: the match is not trivial
    kvs = [r["kv"] for r in kv_recs]
    window = run_method(tiny_rt, Method("window", WindowOnly(heads), 0.0, matched_window(kvs)), samples, ids, text)
    rand = run_method(tiny_rt, Method("random", RandomEviction(leave_rates(kvs, 32), seed=0), 0.0, 32), samples, ids,
                      text)
    assert summarise(window)["compression"] == pytest.approx(c, abs=0.02)
    assert summarise(rand)["compression"] == pytest.approx(c, abs=0.02)
    kept = lambda recs: torch.tensor([r["kv"]["kept"] for r in recs], dtype=torch.float).mean(0)  # noqa: E731
    assert torch.allclose(kept(rand), kept(kv_recs), rtol=0.12)  # per head, not just on average
    assert [r["index"] for r in rand] == [0, 1, 2] and all(r["score"] in (0.0, 1.0) for r in rand)


def test_question_is_fed_after_the_context_over_the_cache(tiny_rt):
    """Full cache: forcing the question one token per step after the context's prefill gives the
    answer that prefilling context + question in one prompt gives (greedy); with eviction the
    question's tokens are fed too (the kv report counts them)."""
    samples = make_samples("niah_single_noise", 500, 2, seed=3, count=count)
    recs = run_method(tiny_rt, Method("full", None, 0.0, 32), samples, ids, text)
    for s, r in zip(samples, recs):
        context, question = ids(s)
        (one,) = tiny_rt.generate([context + question], tiny_rt.sampling(max_new_tokens=s.max_new_tokens,
                                                                          stop_token_ids=()))
        assert r["output"] == text(one.token_ids) and len(one.token_ids) == s.max_new_tokens
        assert r["kv"]["tokens"] == len(context) + len(question) + s.max_new_tokens - 1
        assert r["prompt_tokens"] == len(context) + len(question)


def test_report_files_are_written_and_valid(tiny_rt, tmp_path):
    surrogate = random_surrogate("linear", 3, 64, tiny_rt.loaded.config.num_kv_heads, seed=1)
    runs = evaluate(tiny_rt, ids, text, count, ["qa"], [900], 2, 0, {"rand": surrogate}, [0.0], batch=2)
    assert [r["method"] for r in runs] == ["full", "kvzap", "window", "random"]
    assert [r["matched_to"] for r in runs[2:]] == [runs[1]["key"]] * 2
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    report = {"meta": {"model": "tiny", "samples": 2}, "config": {}, "runs": runs}
    write_report(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    back = json.loads((out / "report.json").read_text())
    assert len(back["runs"]) == len(runs) and back["runs"][1]["records"][0]["answers"]
    md = (out / "report.md").read_text()
    assert "| qa | 0.0 |" in md and "| kvzap rand tau=0 | 1 |" in md
    assert "| kvzap rand tau=0 | 2 | " in md  # the paired table: 2 samples against full, window, random
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baselines_run_only_where_asked_and_the_report_marks_the_missing(tiny_rt, tmp_path):
    surrogate = random_surrogate("linear", 3, 64, tiny_rt.loaded.config.num_kv_heads, seed=1)
    for baselines, methods in ((("random",), ["full", "kvzap", "random"]), ((), ["full", "kvzap"])):
        runs = evaluate(tiny_rt, ids, text, count, ["qa"], [900], 2, 0, {"rand": surrogate}, [0.0], batch=2,
                        baselines=baselines)
        assert [r["method"] for r in runs] == methods
    write_report({"meta": {"model": "tiny"}, "config": {}, "runs": runs}, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| - (-) | - (-) |" in md  # window and random of the summary table: not run
    assert re.search(r"\| kvzap rand tau=0 \| 2 \| [^|]+ \| - \| - \|", md)  # the paired table
    with pytest.raises(KvzapError, match="unknown baseline 'streaming'"):
        evaluate(tiny_rt, ids, text, count, ["qa"], [900], 2, 0, {"rand": surrogate}, [0.0], baselines=("streaming",))


def test_report_write_is_all_or_nothing(tmp_path, monkeypatch):
    import kvzap_trt.eval.report as report_mod

    out = tmp_path / "r"
    out.mkdir()
    (out / "report.md").write_text("previous")
    monkeypatch.setattr(report_mod, "plot", lambda *a: (_ for _ in ()).throw(RuntimeError("plot failed")))
    with pytest.raises(RuntimeError):
        report_mod.write_report({"meta": {"model": "m"}, "config": {}, "runs": []}, out)
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "previous"


def planted_runs(kvzap_scores, full_scores, random_scores, indices=None):
    """Runs as suite.evaluate returns them, with what the report reads: one group of samples."""
    def run(method, key, scores, matched_to=None, idx=None):
        recs = [{"index": i, "score": x} for i, x in zip(idx or range(len(scores)), scores)]
        return {"method": method, "key": key, "matched_to": matched_to, "task": "niah", "length": 64,
                "records": recs, "accuracy": 100 * sum(scores) / len(scores), "surrogate": "s",
                "compression": 0.0 if method == "full" else 0.5, "bytes_allocated": 1.0, "bytes_dense": 2.0,
                "prompt_tokens": 64.0}
    return [run("full", "full", full_scores), run("kvzap", "kvzap s tau=0", kvzap_scores),
            run("random", "random ~ kvzap s tau=0", random_scores, "kvzap s tau=0", indices)]


def test_paired_summary_pairs_samples_by_index_against_full_and_baselines():
    (row,) = paired_summary(planted_runs([1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]))
    assert row["config"] == "kvzap s tau=0" and row["samples"] == 4 and "window" not in row
    assert (row["full"]["delta"], row["full"]["lower"], row["full"]["higher"]) == (0.0, 1, 1)
    assert (row["random"]["delta"], row["random"]["lower"], row["random"]["higher"]) == (50.0, 0, 2)
    assert row["random"]["low"] < 50.0 < row["random"]["high"] <= 100.0  # in points, as delta
    with pytest.raises(ValueError, match="its random run hold different samples"):
        paired_summary(planted_runs([1, 1], [1, 1], [0, 1], indices=[0, 5]))


def test_report_module_rewrites_tables_from_report_json(tmp_path, capsys):
    out = tmp_path / "r"
    report = {"meta": {"model": "m"}, "config": {}, "runs": planted_runs([1, 0, 1], [1, 1, 1], [0, 0, 1])}
    write_report(report, out)
    (out / "report.md").write_text("an older table")
    (out / "report.png").unlink()
    (out / "notes.txt").write_text("mine")
    before = (out / "report.json").read_bytes()
    assert report_main([str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| kvzap s tau=0 | 3 | -33.3 [" in md and "; 1 lower / 0 higher; p 1 |" in md
    assert (out / "report.json").read_bytes() == before and (out / "report.png").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # only the two rendered files are rewritten
    assert report_main([str(tmp_path / "missing")]) == 2 and "cannot read report.json" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text('{"kind": "mlp"}')  # a surrogate's report, say
    assert report_main([str(tmp_path / "other")]) == 2
    assert "is not a `kvzap-trt eval` report" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "nope"], "unknown task"),
    (["--thresholds", "nan"], "finite"),
    (["--thresholds", "x"], "comma-separated list of float"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--lengths", "0"], "--lengths must be positive"),
    (["--baselines", "window, sink"], "unknown baseline 'sink': the baselines are window, random (or none)"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    try:
        code = main(["eval", *argv])
    except SystemExit as e:  # argparse's own errors (a malformed list)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_needs_a_tokenizer_and_a_surrogate(tiny_dirs, capsys):
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--samples", "1"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--thresholds", "0"]) == 2
    assert "needs a surrogate" in capsys.readouterr().err


def test_cli_refuses_a_length_that_leaves_no_room_for_the_answer(smollm2_dir, capsys):
    # SmolLM2's context is 8192 positions (its config.json); a needle's answer may take 16 tokens.
    assert main(["eval", "--lengths", "8192", "--tasks", "niah_single_text", "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lengths 8192 leaves no room for the answer" in err and "use --lengths up to 8176" in err
