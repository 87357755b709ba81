"""`heron align METHOD RECIPE` end to end on the synthetic task: each method reads its
recipe, trains from the base checkpoint and writes a checkpoint with lineage and metrics;
a bad recipe fails before any work, naming the field."""
import json
import re

import pytest
import yaml

import heron
from heron.align.synthetic import RepeatTask
from heron.cli.main import main
from heron.train.checkpoint import resolve_checkpoint


def recipe(folder, base, name, **extra):
    raw = {"name": name, "out_dir": str(folder / name), "base": str(base),
           "data": {"task": {"n": 64}, "max_len": 64}, "fit": {"steps": 4, "batch_size": 8}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_method_writes_a_checkpoint_with_lineage_and_metrics(base, tmp_path, capsys):
    assert main(["align", "sft", str(recipe(tmp_path, base, "sft"))]) == 0
    sft = tmp_path / "sft" / "model"
    runs = {"rm": {}, "dpo": {"preference": {"loss": "dpo"}}, "ppo": {"ppo": {"steps": 2, "prompts_per_step": 16}},
            "grpo": {"grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 4}}}
    for method, extra in runs.items():
        assert main(["align", method, str(recipe(tmp_path, sft, method, **extra))]) == 0, method
        lineage = json.loads((tmp_path / method / "model" / "lineage.json").read_text())["alignment"]
        assert lineage["method"] == method and lineage["base"] == str(sft.resolve())
        rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == (2 if method in ("ppo", "grpo") else 4) and lineage["final"] == rows[-1]
    assert (tmp_path / "ppo" / "reward_kl.png").is_file() and (tmp_path / "grpo" / "reward_kl.png").is_file()
    reward_model, _ = heron.load(tmp_path / "rm" / "model")
    assert reward_model.config.head == "scalar"
    assert resolve_checkpoint(tmp_path / "dpo") == tmp_path / "dpo" / "model"  # the run folder names its model
    assert main(["generate", str(tmp_path / "dpo"), "--prompt", "Add", "--max-new-tokens", "2"]) == 0
    # PPO with the trained reward model instead of the judge
    assert main(["align", "ppo", str(recipe(tmp_path, sft, "ppo-rm", reward=str(tmp_path / "rm" / "model"),
                                            ppo={"steps": 1, "prompts_per_step": 16}))]) == 0


@pytest.mark.parametrize("override, field", [  # a field the --set gave is named as typed; another by its name
    ("fit.stepz=3", "--set fit.stepz=3: unknown field"),
    ("preference.loss=kto-ish", "--set preference.loss=kto-ish: "),
    ("ppo.prompts_per_step=10", "ppo.minibatch: 16 does not divide prompts_per_step 10"),
    ("grpo.group=3", "--set grpo.group=3: unknown field"),
    ("grpo.group_size=1", "--set grpo.group_size=1: a group needs at least 2 replies to compare, got 1"),
    ("fit.grad_accum=3", "--set fit.grad_accum=3: 3 does not divide batch_size"),
    ("data.file=x.jsonl", "data: Value error, set exactly one of data.task or data.file"),
])
def test_a_bad_recipe_names_the_field_before_any_work(base, tmp_path, capsys, override, field):
    assert main(["align", "dpo", str(recipe(tmp_path, base, "bad")), "--set", override]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method, name", [("sft", "task-sft"), ("dpo", "task-dpo")])
def test_shipped_task_recipes_run_by_name(base, tmp_path, method, name):
    """The demo's recipes ship with Heron: `heron align sft task-sft` needs no file of the user's."""
    out = tmp_path / name
    args = ["align", method, name, "--set", f"base={base}", "--set", f"out_dir={out}", "--set", "fit.steps=2",
            "--set", "data.task.n=16"]
    assert main(args) == 0
    recipe = json.loads((out / "model" / "lineage.json").read_text())["alignment"]["recipe"]
    assert recipe["name"] == name and recipe["fit"]["steps"] == 2


@pytest.mark.parametrize("method, settings", [("ppo", {"prompts_per_step": 32}),
                                              ("grpo", {"prompts_per_step": 32, "group_size": 2})])
def test_more_prompts_per_step_than_prompts_is_named(base, tmp_path, capsys, method, settings):
    """Each step draws distinct prompts; 16 prompts cannot give 32 (random.sample's own error
    said "Sample larger than population")."""
    extra = {"data": {"task": {"n": 16}, "max_len": 64}, method: {"steps": 1, **settings}}
    assert main(["align", method, str(recipe(tmp_path, base, method, **extra))]) == 2
    assert f"{method}.prompts_per_step: 32 exceeds the 16 prompts given" in capsys.readouterr().err


def test_a_reward_model_needs_room_for_the_longest_rollout(base, tmp_path, capsys):
    """The reward model scores prompt + reply rows of at most data.max_len tokens: a max_len
    that only fits the prompts failed after the first rollout ("row 0: 33 tokens exceed")."""
    assert main(["align", "rm", str(recipe(tmp_path, base, "rm"))]) == 0
    extra = {"data": {"task": {"n": 16}, "max_len": 24}, "reward": str(tmp_path / "rm" / "model"),
             "ppo": {"steps": 1, "prompts_per_step": 16}}
    assert main(["align", "ppo", str(recipe(tmp_path, base, "ppo", **extra))]) == 2
    err = capsys.readouterr().err
    assert "data.max_len: 24 is less than the longest prompt (" in err and "plus ppo.max_new_tokens (16)" in err


def test_what_would_be_lost_or_cannot_run_is_refused_before_any_work(base, tmp_path, capsys):
    run = tmp_path / "trained"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["align", "sft", str(recipe(tmp_path, base, "sft", out_dir=str(run)))]) == 2  # a training run
    assert "trained holds checkpoints, not an alignment run's files" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert main(["compress", "quantize", str(base), str(tmp_path / "q8")]) == 0
    assert main(["align", "sft", str(recipe(tmp_path, tmp_path / "q8", "on-q8"))]) == 2
    assert "q8 is quantised; align the full-precision model, then quantise the result" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    empty = {"data": {"file": str(tmp_path / "empty.jsonl"), "max_len": 64}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "empty-dpo", **empty))]) == 2
    assert "data.file: " in (err := capsys.readouterr().err) and "empty.jsonl holds no rows" in err
    assert main(["align", "ppo", str(recipe(tmp_path, base, "kl", ppo={"kl_coef": -1.0}))]) == 2
    assert "ppo.kl_coef: must be >= 0, got -1.0" in capsys.readouterr().err
    assert main(["align", "dpo", str(recipe(tmp_path, base, "inf", fit={"steps": 2, "lr": float("inf")}))]) == 2
    assert "fit.lr: Input should be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("file, complaint", [("missing.jsonl", "no such file"),
                                             ("chats", "a folder; give the JSONL file")])
def test_a_data_file_that_is_not_a_file_is_named_before_any_work(tmp_path, capsys, file, complaint):
    """It was Python's OSError, naming no field, once the base was loaded and out_dir made."""
    (tmp_path / "chats").mkdir()
    data = {"data": {"file": str(tmp_path / file), "max_len": 64}}
    assert main(["align", "sft", str(recipe(tmp_path, tmp_path / "no-base", "bad", **data))]) == 2
    assert capsys.readouterr().err == f"heron align: error: data.file: {tmp_path / file}: {complaint}\n"
    assert not (tmp_path / "bad").exists()

def test_conversational_pairs_from_the_feedback_store_train_a_reward_model(base, tmp_path):
    """`heron feedback export` writes a chat's pair with messages: the prompt's turns, and each
    reply as one assistant message (TRL's conversational form)."""
    pairs = RepeatTask().preference_pairs(16, seed=0)
    rows = [{"prompt": p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["feedback", "import", str(tmp_path / "pairs.jsonl"), "--db", str(tmp_path / "fb.db"),
                 "--annotator", "alice"]) == 0
    assert main(["feedback", "export", str(tmp_path / "out.jsonl"), "--db", str(tmp_path / "fb.db")]) == 0
    exported = {"data": {"file": str(tmp_path / "out.jsonl"), "max_len": 64}, "fit": {"steps": 2, "batch_size": 8}}
    assert main(["align", "rm", str(recipe(tmp_path, base, "rm-chat", **exported))]) == 0


def test_data_files_as_users_write_them(base, tmp_path, capsys):
    """A BOM is read past; a line that is no object, a tie and grpo's group of one are named."""
    pairs = RepeatTask().preference_pairs(8, seed=0)
    lines = "".join(json.dumps(p) + "\n" for p in pairs)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    bom = {"data": {"file": str(tmp_path / "bom.jsonl"), "max_len": 64}, "fit": {"steps": 1, "batch_size": 8}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "bom", **bom))]) == 0
    (tmp_path / "three.jsonl").write_text(json.dumps(pairs[0]) + "\n3\n")
    three = {"data": {"file": str(tmp_path / "three.jsonl"), "max_len": 64}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "three", **three))]) == 2
    assert "three.jsonl:2: expected a JSON object, got int" in capsys.readouterr().err
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(pairs[0]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    latin1 = {"data": {"file": str(tmp_path / "latin1.jsonl"), "max_len": 64}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "latin1", **latin1))]) == 2
    assert "latin1.jsonl:2: not UTF-8 (invalid continuation byte at byte 16 of the line)" in capsys.readouterr().err
    (tmp_path / "tie.jsonl").write_text(json.dumps({**pairs[0], "rejected": pairs[0]["chosen"]}) + "\n")
    tie = {"data": {"file": str(tmp_path / "tie.jsonl"), "max_len": 64}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "tie", **tie))]) == 2
    assert "tie.jsonl:1: 'chosen' and 'rejected' are the same reply" in capsys.readouterr().err
    human = {**pairs[0], "prompt": [{"role": "human", "content": "hi"}]}
    (tmp_path / "roles.jsonl").write_text("\n" + json.dumps(pairs[1]) + "\n\n" + json.dumps(human) + "\n")
    roles = {"data": {"file": str(tmp_path / "roles.jsonl"), "max_len": 64}}
    assert main(["align", "dpo", str(recipe(tmp_path, base, "roles", **roles))]) == 2
    assert "roles.jsonl:4 with its chosen reply: " in capsys.readouterr().err  # the file's line, blank lines counted
    assert main(["align", "grpo", str(recipe(tmp_path, base, "g1", grpo={"group_size": 1}))]) == 2
    assert "group_size: a group needs at least 2 replies" in capsys.readouterr().err


def test_sft_trains_every_assistant_turn_of_a_chat(base):
    from heron.align.data import encode_chats

    _, tokenizer = heron.load(base)
    chat = [{"role": "user", "content": "apple"}, {"role": "assistant", "content": "apple apple"},
            {"role": "user", "content": "pear"}, {"role": "assistant", "content": "pear"}]
    rows = encode_chats(tokenizer, [chat], max_len=64)
    ids, mask = tokenizer.encode_chat(chat)
    trained = [i for i, m in zip(rows.ids[0].tolist(), rows.mask[0].tolist()) if m]
    assert trained == [i for i, m in zip(ids, mask) if m]  # as data/chat.py trains a chat: both replies
    assert tokenizer.decode(trained) == "apple applepear"


def test_an_sft_chat_without_a_final_reply_is_named_by_its_file_line(base, tmp_path, capsys):
    """Blank lines count: the chat on line 4 is the file's second chat, and named line 4."""
    chats = RepeatTask().sft_chats(2, seed=0)
    open_ended = chats[1][:-1]
    (tmp_path / "sft.jsonl").write_text("\n" + json.dumps({"messages": chats[0]}) + "\n\n"
                                        + json.dumps({"messages": open_ended}) + "\n")
    sft = {"data": {"file": str(tmp_path / "sft.jsonl"), "max_len": 64}, "fit": {"steps": 1, "batch_size": 2}}
    assert main(["align", "sft", str(recipe(tmp_path, base, "sft_line", **sft))]) == 2
    assert "sft.jsonl:4: the chat does not end with an assistant reply" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["too long", "reply alone"])
def test_a_refused_sft_chat_is_named_by_its_file_line(base, tmp_path, capsys, kind):
    """Blank lines before it: the bad chat is the file's second, on line 4, and is named so."""
    chats = RepeatTask().sft_chats(2, seed=0)
    bad = chats[1][:-1] + [{"role": "assistant", "content": "word " * 200}] if kind == "too long" else chats[1][-1:]
    (tmp_path / "sft.jsonl").write_text("\n" + json.dumps({"messages": chats[0]}) + "\n\n"
                                        + json.dumps({"messages": bad}) + "\n")
    sft = {"data": {"file": str(tmp_path / "sft.jsonl"), "max_len": 64}, "fit": {"steps": 1, "batch_size": 2}}
    assert main(["align", "sft", str(recipe(tmp_path, base, "sft_refused", **sft))]) == 2
    said = {"too long": r"sft.jsonl:4 is \d+ tokens, more than max_len 64",
            "reply alone": "sft.jsonl:4: the chat is an assistant reply alone; give the user"}[kind]
    assert re.search(said, capsys.readouterr().err)
