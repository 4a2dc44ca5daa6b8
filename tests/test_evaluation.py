"""Downstream evaluation (megatron_lite/evaluation, tools/evaluate.py).

A random 2-layer GPT over a tiny byte-level BPE is saved and exported to HF format. Per-request
log-likelihoods must equal transformers' on the export (1e-4 relative) and be the same at tp 2,
pp 2, tp 2 x pp 2 and dp 2 as in one process (generation too); each reader must read its public
format and name file:line for a malformed one; pass@k must be Chen et al.'s estimator.
"""

import gzip
import importlib.util
import itertools
import json
import math

import pytest
import torch
from eval_util import save_tiny_model, write_jsonl, write_tasks

from megatron_lite.distributed.testing import run_distributed
from megatron_lite.evaluation import metrics
from megatron_lite.evaluation.requests import Scorer, rolling_windows
from megatron_lite.evaluation.runner import evaluate_tasks
from megatron_lite.evaluation.tasks import TaskError, load_task, load_tasks
from megatron_lite.inference.generation import build_generation_tokenizer, load_model
from megatron_lite.parallel_state import ParallelState

transformers = pytest.importorskip("transformers")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
REQUESTS = [
    ("the cat sat on the", " mat"),
    ("a big red", " dog ran in the sun"),
    ("", "then the hen"),
    ("in the bed ", "the pig"),  # trailing space moves to the continuation
    ("the " * 30, "fun fun"),  # longer than the model: the context is cut on the left
]
GEN = [("the cat", {"until": [" dog"], "max_gen_toks": 8}), ("a hat", {"max_gen_toks": 5})]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalmodel")
    ckpt, hf = save_tiny_model(d, seq_length=32)
    return {"ckpt": ckpt, "hf": hf, "tasks": write_tasks(d / "tasks")}


@pytest.fixture(scope="module")
def scorer(model):
    lm = load_model(model["ckpt"], dtype=torch.float32, device=CPU)
    return Scorer(lm, build_generation_tokenizer(lm), batch_size=2)


def _transformers_loglikelihoods(hf_dir, pairs, max_len):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            inp = (ctx + cont)[-(max_len + 1) :][:-1]
            logp = model(torch.tensor([inp])).logits[0].log_softmax(-1)[len(inp) - len(cont) :]
            target = torch.tensor(cont)
            out.append(
                (
                    logp.gather(-1, target[:, None]).sum().item(),
                    bool((logp.argmax(-1) == target).all()),
                )
            )
    return out


def test_loglikelihoods_equal_transformers_on_the_hf_export(model, scorer):
    ours = scorer.loglikelihood(REQUESTS)
    theirs = _transformers_loglikelihoods(
        model["hf"], [scorer.encode_pair(c, x) for c, x in REQUESTS], scorer.lm.max_length
    )
    rel = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(ours, theirs))
    print(f"\nmax relative difference vs transformers: {rel:.2e}")
    assert rel < 1e-4
    assert [a[1] for a in ours] == [b[1] for b in theirs]
    # our model on the HF files gives the same too
    hf_lm = load_model(model["hf"], dtype=torch.float32, device=CPU)
    again = Scorer(hf_lm, build_generation_tokenizer(hf_lm)).loglikelihood(REQUESTS)
    assert max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(again, theirs)) < 1e-4


def test_batched_sorted_requests_equal_one_at_a_time(scorer):
    batched = scorer.loglikelihood(REQUESTS)
    single = [scorer.loglikelihood([r])[0] for r in REQUESTS]
    assert max(abs(a[0] - b[0]) for a, b in zip(batched, single)) < 1e-5


def test_encoding_moves_trailing_spaces_and_uses_eod_for_an_empty_context(scorer):
    tok = scorer.tok
    assert scorer.encode_pair("in the bed ", "the pig") == (
        tok.tokenize("in the bed"),
        tok.tokenize("in the bed the pig")[len(tok.tokenize("in the bed")) :],
    )
    assert scorer.encode_pair("", "the")[0] == [tok.eod]


def test_rolling_windows_score_every_token_once_with_full_context():
    tokens = list(range(10))
    windows = rolling_windows(tokens, prefix=99, max_len=4)
    assert [c for _, cont in windows for c in cont] == tokens
    assert windows == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    # each window's model input (context + continuation less its last token) is 4 tokens
    assert all(len(ctx + cont) - 1 == 4 for ctx, cont in windows)
    assert rolling_windows([], 99, 4) == []


def test_a_continuation_longer_than_the_model_is_scored_in_pieces(scorer):
    ctx, cont = scorer.encode_pair("the cat", " sat on the mat" * 8)
    assert len(cont) > 32
    ((ll, _),) = scorer.loglikelihood_tokens([(ctx, cont)])
    pieces = [((ctx + cont[:i])[-32:], cont[i : i + 32]) for i in range(0, len(cont), 32)]
    assert ll == pytest.approx(sum(x for x, _ in scorer.loglikelihood_tokens(pieces)), rel=1e-9)


def test_rolling_loglikelihood_equals_the_sum_over_its_windows(scorer):
    text = "the cat sat on the mat " * 12  # longer than the 32 positions
    tokens = scorer.tok.tokenize(text)
    assert len(tokens) > 32
    windows = rolling_windows(tokens, scorer.tok.eod, 32)
    want = sum(ll for ll, _ in scorer.loglikelihood_tokens(windows))
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(want, rel=1e-9)


def _scores_at(layouts, ckpt):
    out = []
    for tp, pp in layouts:
        ps = ParallelState.build(tp, pp)
        lm = load_model(ckpt, ps, dtype=torch.float32, device=CPU, data_parallel=True)
        s = Scorer(lm, build_generation_tokenizer(lm), batch_size=2)
        out.append(
            (
                s.loglikelihood(REQUESTS),
                s.loglikelihood_rolling(["the cat sat on the mat " * 8, "a hen"]),
                s.generate_until(GEN),
                s.generate_until([("the dog", {"temperature": 1.0, "max_gen_toks": 6, "seed": 4})]),
            )
        )
    return out


def test_tp2_pp2_and_dp2_give_the_single_process_scores(model, scorer):
    want = (
        scorer.loglikelihood(REQUESTS),
        scorer.loglikelihood_rolling(["the cat sat on the mat " * 8, "a hen"]),
        scorer.generate_until(GEN),
        scorer.generate_until([("the dog", {"temperature": 1.0, "max_gen_toks": 6, "seed": 4})]),
    )
    layouts = [(2, 1), (1, 2), (1, 1)]  # tp 2; pp 2; dp 2
    results = run_distributed(_scores_at, 2, layouts, model["ckpt"], timeout=120)
    results += run_distributed(_scores_at, 4, [(2, 2)], model["ckpt"], timeout=120)
    worst = 0.0
    for per_rank in results:
        for ll, rolling, gen, sampled in per_rank:
            worst = max(worst, *(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(ll, want[0])))
            worst = max(worst, *(abs(a - b) / abs(b) for a, b in zip(rolling, want[1])))
            assert [a[1] for a in ll] == [b[1] for b in want[0]]
            assert (gen, sampled) == (want[2], want[3])
    print(f"\nmax relative difference tp2 / pp2 / dp2 / tp2xpp2 vs one process: {worst:.2e}")
    assert worst < 1e-4


def test_generation_stops_before_the_stop_sequence(scorer):
    free = scorer.generate_until([("the cat", {"max_gen_toks": 12})])[0]
    stop = next(ch for ch in free[1:] if ch.isascii() and ch.isprintable())  # a random model's
    cut = scorer.generate_until([("the cat", {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == free.split(stop)[0] and len(cut) < len(free)


def test_every_reader_reads_its_public_format_and_tasks_score(model, scorer):
    tasks = load_tasks([f"{n}={p}" for n, p in model["tasks"].items()])
    results = evaluate_tasks(scorer, tasks)
    assert set(results) == set(model["tasks"])
    for name in ("hellaswag", "arc_easy", "piqa", "mmlu"):
        assert set(results[name]) == {"acc", "acc_norm"}
        assert 0 <= results[name]["acc"] <= 1
    assert results["lambada"]["perplexity"] > 1
    assert results["perplexity"]["bits_per_byte"] > 0
    hs = load_task(f"hellaswag={model['tasks']['hellaswag']}").docs[0]
    assert "[title]" not in hs.choices[0] and hs.context.startswith("Cats: ")
    mm = load_task(f"mmlu={model['tasks']['mmlu']}")
    assert len(mm.docs) == 12 and mm.docs[0].context.endswith("\nAnswer:")
    assert "\nD. " in mm.docs[0].context and mm.docs[0].choices == ["A", "B", "C", "D"]


def test_fewshot_prompts_are_seeded_and_mmlu_draws_from_its_subjects_dev_split(model):
    mm = load_task(f"mmlu={model['tasks']['mmlu']}")
    a, b, c = mm.contexts(2, 1), mm.contexts(2, 1), mm.contexts(2, 7)
    assert a == b and a != c
    first = a[0]
    assert first.startswith("The following are multiple choice questions (with answers) about ")
    assert first.count("\nAnswer:") == 3  # two solved examples, then the question
    dev = [d.solved() for d in mm.fewshot_pool if d.extra["group"] == mm.docs[0].extra["group"]]
    assert sum(s in first for s in dev) == 2
    arc = load_task(f"arc_easy={model['tasks']['arc_easy']}")
    for doc, ctx in zip(arc.docs, arc.contexts(3, 1234)):
        assert ctx.endswith(doc.context) and doc.solved() not in ctx[: -len(doc.context)]
        assert ctx.count("Question:") == 4


def test_arc_reads_ai2s_original_nested_format(tmp_path):
    row = {
        "id": "x",
        "question": {
            "stem": "Why?",
            "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}],
        },
        "answerKey": "B",
    }
    doc = load_task(f"arc_challenge={write_jsonl(tmp_path / 'a.jsonl', [row])}").docs[0]
    assert (doc.context, doc.choices, doc.gold) == ("Question: Why?\nAnswer:", ["a", "b"], 1)


def test_malformed_task_files_name_file_line_and_what_was_expected(tmp_path, model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": "oops\n')
    with pytest.raises(TaskError, match=rf"{bad}:2: not valid JSON"):
        load_task(f"lambada={bad}")
    bad.write_text('{"text": "a b"}\n\n{"txt": "a b"}\n')
    with pytest.raises(TaskError, match=rf"{bad}:3: expected a 'text' field \(a passage\)"):
        load_task(f"lambada={bad}")
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}\n')
    with pytest.raises(TaskError, match=rf"{bad}:1: 'label' is 2, expected an index in \[0, 2\)"):
        load_task(f"piqa={bad}")
    bad.write_text(
        '{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}\n'
    )
    with pytest.raises(TaskError, match=r"bad.jsonl:1: answerKey 'C' is not one of the labels"):
        load_task(f"arc_easy={bad}")
    csv_dir = tmp_path / "mmlu" / "test"
    csv_dir.mkdir(parents=True)
    (csv_dir / "law_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,A\n")
    with pytest.raises(TaskError, match=r"law_test.csv:2: expected 6 columns .* got 5"):
        load_task(f"mmlu={tmp_path / 'mmlu'}")
    good = '{"task_id": "t/0", "prompt": "def f():\\n", "test": "", "entry_point": "f"}\n'
    bad.write_bytes(good.encode() + b'{"task_id": "t/1", "prompt": "\xff\xfe"}\n')
    with pytest.raises(TaskError, match=rf"{bad}:2: not valid UTF-8 \(byte 0xff at column 31\)"):
        load_task(f"humaneval={bad}")
    gz = tmp_path / "HumanEval.jsonl.gz"
    gz.write_bytes(gzip.compress(good.encode() * 50)[:-30])  # truncated
    with pytest.raises(TaskError, match=rf"{gz}: cannot be read to the end"):
        load_task(f"humaneval={gz}")


def test_unknown_task_is_listed_against_the_known_ones(tmp_path):
    with pytest.raises(
        TaskError,
        match=r"unknown task 'lambda'; known tasks: arc_challenge, arc_easy, choice, hellaswag, humaneval, lambada, mmlu",
    ):
        load_tasks("lambda=x.jsonl")
    with pytest.raises(TaskError, match=r"does not exist"):
        load_tasks(f"lambada={tmp_path / 'none.jsonl'}")
    with pytest.raises(TaskError, match=r"give a tasks directory holding lambada_test.jsonl"):
        load_tasks("lambada")


def test_metrics_follow_their_definitions():
    assert metrics.acc([-3.0, -1.0, -2.0], 1) == 1.0
    # per character: -4/8 beats -3/2, so the longer choice wins acc_norm but not acc
    assert metrics.acc([-4.0, -3.0], 1) == 1.0
    assert metrics.acc_norm([-4.0, -3.0], ["abcdefgh", "ab"], 0) == 1.0
    assert metrics.perplexity([-1.0, -3.0]) == pytest.approx(math.e**2)
    texts = ["a b c", "d"]
    assert metrics.word_perplexity([-2.0, -2.0], texts) == pytest.approx(math.exp(1.0))
    assert metrics.bits_per_byte([-math.log(2) * 6], texts) == pytest.approx(1.0)
    assert metrics.exact_match(" 42 ", "42") == 1.0


def test_pass_at_k_is_the_unbiased_estimator():
    # brute force: the chance that a random k-subset of n samples holds a passing one
    for n, c, k in [(5, 2, 1), (5, 2, 3), (10, 1, 5), (6, 0, 2), (4, 4, 4), (7, 3, 7)]:
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(want)
    with pytest.raises(ValueError, match="at least 10 samples"):
        metrics.pass_at_k(5, 1, 10)


def _evaluate_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools/evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_tool_prints_a_table_writes_json_and_refuses_unknown_tasks(
    model, tmp_path, capsys
):
    tool = _evaluate_tool()
    out = tmp_path / "r.json"
    tasks = f"lambada={model['tasks']['lambada']},arc_easy={model['tasks']['arc_easy']}"
    assert tool.main(["--load", model["ckpt"], "--tasks", tasks, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lambada | acc |" in printed and "| arc_easy | acc_norm |" in printed
    results = json.loads(out.read_text())
    assert set(results) == {"lambada", "arc_easy"}
    assert tool.main(["--load", model["ckpt"], "--tasks", "arc_hard=x"]) == 2
    assert "known tasks: arc_challenge" in capsys.readouterr().err
