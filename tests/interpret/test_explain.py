"""`heron explain`: the report is complete (every section, every referenced file
on disk) for a Heron model, a MoE model and a Hugging Face folder."""
import pytest
import torch

import heron
from heron.cli.main import main
from heron.core import ModelConfig, MoEConfig, Transformer
from heron.interpret.explain import MARKER, PAGE, ExplainSettings, explain
from heron.interpret.html import missing_files
from heron.tokenizer import train_tokenizer
from heron.train.checkpoint import save_model_folder

TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(100)]
PROMPT = "def f_3(x):\n    return x"
SECTIONS = ["Prediction", "Logit lens", "Direct logit attribution", "Attention patterns", "Attention heads",
            "Input attribution"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, progress=False)


def model_for(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
                            "max_seq_len": 64, "init_std": 0.2, **overrides})
    return Transformer(config).eval()


def a_corrupted_prompt(model, tokenizer) -> str:
    """A prompt of the same token length as PROMPT whose top prediction differs."""
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        clean = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    for token in range(300):
        corrupted = ids[:-1] + [token]
        text = tokenizer.decode(corrupted)
        if tokenizer.encode(text) != corrupted:
            continue
        with torch.no_grad():
            if int(model(torch.tensor([corrupted])).logits[0, -1].argmax()) != clean:
                return text
    raise AssertionError("no corrupted prompt found")


def test_the_report_has_every_section_and_every_file(tokenizer, tmp_path):
    model = model_for()
    corrupted = a_corrupted_prompt(model, tokenizer)
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT, corrupted=corrupted), tmp_path)
    text = page.read_text()
    assert missing_files(page) == []
    for title in SECTIONS + ["Activation patching"]:
        assert f">{title}</h2>" in text
    assert text.count("<img ") == 1 + 1 + 2 + 2 + 2 + 2  # lens, dla, 2 attention layers, 2 head scores, ig + gxi, patching
    assert "energy of this report" in text and "Mixture-of-Experts" not in text


def test_a_moe_model_gets_its_routing_section(tokenizer, tmp_path):
    model = model_for(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=2))
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path)
    assert ">Mixture-of-Experts routing</h2>" in page.read_text() and missing_files(page) == []


def test_a_model_with_a_short_context_scores_its_heads_on_a_shorter_period(tokenizer, tmp_path):
    """The heads section repeats a random sequence once: 2 x 16 tokens were more than a 24-token
    context holds, and the whole report failed whatever the prompt's length."""
    page = explain(model_for(max_seq_len=24), tokenizer, ExplainSettings(prompt=PROMPT), tmp_path)
    assert "Scores on 8 sequences of 12 random tokens repeated once" in page.read_text()
    with pytest.raises(ValueError, match="head_period: expected a whole number of at least 2, got 1"):
        ExplainSettings(prompt=PROMPT, head_period=1)


def test_cli_on_a_checkpoint_and_clear_errors(tokenizer, tmp_path, capsys):
    save_model_folder(tmp_path / "ckpt", model_for(), tokenizer=tokenizer)
    assert main(["explain", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", str(tmp_path / "out")]) == 0
    assert missing_files(tmp_path / "out" / PAGE) == []
    assert "wrote" in capsys.readouterr().out
    assert main(["explain", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", str(tmp_path / "o2"),
                 "--target", "def f"]) == 2
    assert "target: 'def f' is" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^corrupted: .* tokens, but the prompt has"):
        explain(model_for(), tokenizer, ExplainSettings(prompt=PROMPT, corrupted="x"), tmp_path / "o3")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # no half-written report
    assert main(["explain", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", str(tmp_path / "out")]) == 0
    assert missing_files(tmp_path / "out" / PAGE) == []  # an earlier report is replaced
    assert main(["explain", str(tmp_path / "ckpt"), "--prompt", PROMPT, "--out", str(tmp_path / "ckpt")]) == 2
    assert "ckpt: holds files heron explain did not write (config.json" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_a_reward_model_is_refused_before_any_work_naming_its_head_and_what_explains_its_score(
        tokenizer, tmp_path, capsys):
    """A scalar head (head="scalar") gives a score, not next-token logits: without --target the
    report read it as a one-token vocabulary (p = 1.000 everywhere); with one, an IndexError."""
    save_model_folder(tmp_path / "reward", model_for(head="scalar", tie_embeddings=False), tokenizer=tokenizer)
    for target in ([], ["--target", " x"]):
        argv = ["explain", str(tmp_path / "reward"), "--prompt", PROMPT, "--out", str(tmp_path / "out"), *target]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("heron explain: error: explain: a model with head 'scalar' gives one score per "
                              "position, not next-token logits")
        assert "direct_logit_attribution, integrated_gradients or gradient_x_input with target=0" in err
    assert not (tmp_path / "out").exists()


def test_too_many_ig_steps_are_refused_before_any_work(tmp_path, capsys):
    """1e11 Gauss-Legendre nodes would end in a MemoryError; the flag is named, no checkpoint is read."""
    with pytest.raises(ValueError, match="^ig_steps: expected a whole number from 1 to 1024"):
        ExplainSettings(prompt=PROMPT, ig_steps=1025)
    argv = ["explain", str(tmp_path / "none"), "--prompt", PROMPT, "--out", str(tmp_path / "o"),
            "--ig-steps", "100000000000"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("heron explain: error: --ig-steps: expected a whole number from 1 to 1024, "
                                       "got 100000000000\n")


def test_a_hugging_face_folder_is_explained_too(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model, loaded_tokenizer = heron.load(tmp_path / "hf")
    page = explain(model, loaded_tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "out")
    assert missing_files(page) == [] and ">Logit lens</h2>" in page.read_text()


def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_was(tokenizer, tmp_path):
    """An index.html is not enough to be a report: the user's files beside it would be deleted."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / PAGE).write_text("my page")
    (tmp_path / "site" / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"site: holds files heron explain did not write \(index.html, "
                                              r"notes.txt\); replacing the folder would delete them"):
        explain(model_for(), tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "site")
    assert (tmp_path / "site" / PAGE).read_text() == "my page"
    assert (tmp_path / "site" / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="file: exists and is not a folder"):
        explain(model_for(), tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "site"]  # nothing moved aside


def test_a_report_is_replaced_only_while_it_holds_nothing_but_its_own_files(tokenizer, tmp_path):
    model = model_for()
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")
    assert (page.parent / MARKER).is_file() and (page.parent / "attention" / "layer_0.png").is_file()
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")  # replaced
    assert missing_files(page) == []
    (tmp_path / "report" / "attention" / "mine.txt").write_text("added by hand")
    with pytest.raises(FileExistsError, match=r"holds files heron explain did not write \(attention/mine.txt\)"):
        explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")
    assert (tmp_path / "report" / "attention" / "mine.txt").is_file() and missing_files(page) == []


def test_a_report_from_before_the_marker_is_replaced_too(tokenizer, tmp_path):
    """Reports written before they carried MARKER (a rerun of `heron demo` meets one): the
    page and the images it shows are the report's; a file it does not show is not."""
    model = model_for()
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")
    (page.parent / MARKER).unlink()
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")
    assert (page.parent / MARKER).is_file() and missing_files(page) == []
    (page.parent / MARKER).unlink()
    (page.parent / "mine.png").write_bytes(b"not shown by the page")
    with pytest.raises(FileExistsError, match=r"did not write \(mine.png\)"):
        explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path / "report")


def test_a_moe_model_says_why_integrated_gradients_are_missing(tokenizer, tmp_path):
    model = model_for(feed_forward=("moe",), moe=MoEConfig(n_experts=4, top_k=1))
    page = explain(model, tokenizer, ExplainSettings(prompt=PROMPT), tmp_path)
    text = page.read_text()
    assert "Integrated gradients are not shown" in text and "integrated_gradients.png" not in text
    assert "top-k" in text and "use gradient_x_input" in text and "use more than" not in text
