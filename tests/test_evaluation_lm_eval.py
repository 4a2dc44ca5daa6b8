"""The lm-evaluation-harness adapter (megatron_lite/evaluation/lm_eval_adapter.py).

The real `lm_eval` command line (lm-eval's own CLI, our model found through the installed hook)
scores local task YAMLs over local jsonl files written like lm-eval's own lambada_openai,
hellaswag, arc_easy, piqa, mmlu and wikitext tasks; tools/evaluate.py must give the same
numbers on the same files, zero-shot and few-shot. (Few-shot examples from the scored split
leave the scored doc out: lm-eval does that when fewshot_split is the test split, as written here.)
"""

import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from eval_util import save_tiny_model, write_jsonl, write_tasks

pytest.importorskip("lm_eval")  # installed by `make test`
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
FEWSHOT = {"arc_easy": 2, "mmlu": 2}  # the others zero-shot

YAML = {
    "lambada": """
        output_type: loglikelihood
        doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
        doc_to_target: "{{' '+text.split(' ')[-1]}}"
        metric_list: [{metric: perplexity, aggregation: perplexity}, {metric: acc}]""",
    "hellaswag": """
        output_type: multiple_choice
        process_docs: !function utils.process_docs
        doc_to_text: "{{query}}"
        doc_to_target: "{{label}}"
        doc_to_choice: "choices"
        metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "arc_easy": """
        output_type: multiple_choice
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{choices.label.index(answerKey)}}"
        doc_to_choice: "{{choices.text}}"
        fewshot_split: test
        num_fewshot: 2
        metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "piqa": """
        output_type: multiple_choice
        doc_to_text: "Question: {{goal}}\\nAnswer:"
        doc_to_target: label
        doc_to_choice: "{{[sol1, sol2]}}"
        metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "perplexity": """
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]""",
}
MMLU = """
    output_type: multiple_choice
    doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
    doc_to_choice: ["A", "B", "C", "D"]
    doc_to_target: answer
    num_fewshot: 2
    description: "The following are multiple choice questions (with answers) about SUBJECT_TEXT.\\n\\n"
    metric_list: [{metric: acc}, {metric: acc_norm}]"""


def _mmlu_jsonl(root, yaml_dir) -> list[str]:
    """lm-eval's cais/mmlu form of our CSV files, one task per subject (as lm-eval has)."""
    names = []
    for path in sorted(glob.glob(os.path.join(root, "data", "test", "*_test.csv"))):
        subject = os.path.basename(path)[: -len("_test.csv")]
        files = {}
        for split in ("test", "dev"):
            with open(os.path.join(root, "data", split, f"{subject}_{split}.csv")) as f:
                rows = [
                    {
                        "question": r[0],
                        "subject": subject,
                        "choices": r[1:5],
                        "answer": "ABCD".index(r[5]),
                    }
                    for r in csv.reader(f)
                ]
            files[split] = write_jsonl(yaml_dir / f"mmlu_{subject}_{split}.jsonl", rows)
        body = MMLU.replace("SUBJECT_TEXT", subject.replace("_", " "))
        _write_yaml(yaml_dir, f"ml_mmlu_{subject}", body, files)
        names.append(f"ml_mmlu_{subject}")
    return names


def _write_yaml(yaml_dir, task, body, files):
    data = "".join(f"\n    {split}: {path}" for split, path in files.items())
    splits = "test_split: test\n" + ("fewshot_split: dev\n" if "dev" in files else "")
    text = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:{data}\n{splits}"
    (yaml_dir / f"{task}.yaml").write_text(text + textwrap.dedent(body).strip() + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    ckpt, _ = save_tiny_model(d, seq_length=64)
    tasks = write_tasks(d / "tasks", n=8, seed=5)
    rows = [json.loads(line) for line in open(tasks["piqa"])]
    labels = open(tasks["piqa"][: -len(".jsonl")] + "-labels.lst").read().split()
    tasks["piqa"] = write_jsonl(
        d / "tasks" / "piqa_labelled.jsonl", [{**r, "label": int(x)} for r, x in zip(rows, labels)]
    )
    yaml_dir = d / "yaml"
    yaml_dir.mkdir()
    (yaml_dir / "utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n"
    )
    for name, body in YAML.items():
        _write_yaml(yaml_dir, f"ml_{name}", body, {"test": tasks[name]})
    mmlu_tasks = _mmlu_jsonl(tasks["mmlu"], yaml_dir)
    return d, ckpt, tasks, yaml_dir, mmlu_tasks


def _run_lm_eval_cli(d, ckpt, yaml_dir, task_names):
    """lm-eval's own CLI in a fresh Python whose site directory holds our hook (as `make` installs
    it into site-packages), so `--model megatron_lite` is found the way users find it."""
    site = d / "site"
    site.mkdir(exist_ok=True)
    from megatron_lite.evaluation.lm_eval_adapter import install_hook

    install_hook(str(site))  # what `make` does into site-packages
    code = (  # the `lm_eval` console script, with `site` as one more site directory
        "import site, sys; site.addsitedir(sys.argv[1]); "
        "from lm_eval.__main__ import cli_evaluate; sys.argv = ['lm_eval', *sys.argv[2:]]; cli_evaluate()"
    )
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(d / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(site),
            "--model",
            "megatron_lite",
            "--model_args",
            f"load={ckpt},dtype=fp32",
            "--batch_size",
            "4",
            "--tasks",
            ",".join(task_names),
            "--include_path",
            str(yaml_dir),
            "--output_path",
            str(d / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (path,) = glob.glob(str(d / "out" / "**" / "results_*.json"), recursive=True)
    return json.loads(open(path).read())["results"], out.stdout


def _evaluate_tool(args):
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools/evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = args[-1]
    assert tool.main(args) == 0
    return json.loads(open(out).read())


def test_lm_eval_through_the_adapter_gives_the_scores_of_tools_evaluate(setup):
    d, ckpt, tasks, yaml_dir, mmlu_tasks = setup
    names = [f"ml_{n}" for n in YAML] + mmlu_tasks
    theirs, table = _run_lm_eval_cli(d, ckpt, yaml_dir, names)
    print("\n" + table)
    ours = {}
    for shots in sorted(set(FEWSHOT.values()) | {0}):
        group = [n for n in [*YAML, "mmlu"] if FEWSHOT.get(n, 0) == shots]
        specs = ",".join(f"{n}={tasks[n]}" for n in group)
        out = str(d / f"ours_{shots}.json")
        args = ["--load", ckpt, "--tasks", specs, "--num-fewshot", str(shots), "--batch-size", "3"]
        ours.update(_evaluate_tool([*args, "--output", out]))
    worst = 0.0
    for name in YAML:
        for metric, value in ours[name].items():
            want = theirs[f"ml_{name}"][f"{metric},none"]
            worst = max(worst, abs(value - want) / max(abs(want), 1e-12))
            assert value == pytest.approx(want, rel=1e-6, abs=1e-9), (name, metric)
    # MMLU: lm-eval scores one task per subject; ours is one task, micro-averaged (same sizes)
    want = sum(theirs[t]["acc,none"] for t in mmlu_tasks) / len(mmlu_tasks)
    assert ours["mmlu"]["acc"] == pytest.approx(want, rel=1e-9)
    print(f"max relative difference lm_eval vs tools/evaluate.py: {worst:.2e}")
