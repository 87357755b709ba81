"""Bringing your own weights: `heron.load` on a Hugging Face folder, its
tokenizer and chat template as `transformers` reads them, and `heron convert`
both ways with lineage back to the source files."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import heron  # noqa: E402
from heron.cli.main import main  # noqa: E402
from heron.generate import Generator, SamplingParams  # noqa: E402
from heron.tokenizer import ChatTemplateError, PretrainedTokenizer, train_tokenizer  # noqa: E402
from heron.train.checkpoint import sha256_file  # noqa: E402

STRINGS = ["def f(x):\n    return x", "Hello, world!", "", "unseen ÿ 字 \t tokens"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]


def logits(model, n=24):
    ids = torch.randint(3, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def test_load_reads_a_hugging_face_folder(hf_folder):
    model, tokenizer = heron.load(hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-5
    assert isinstance(tokenizer, PretrainedTokenizer) and (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)


def test_tokenizer_and_chat_template_match_transformers(hf_folder):
    _, ours = heron.load(hf_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    for text in STRINGS:
        assert ours.encode(text) == theirs(text)["input_ids"]  # <s> added by the post-processor
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)
    for prompt in (False, True):
        assert ours.apply_chat_template(CHAT, add_generation_prompt=prompt) == theirs.apply_chat_template(
            CHAT, add_generation_prompt=prompt, tokenize=False)
    assert ours.chat_prompt_ids(CHAT) == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)
    assert ours.chat_stop_ids == (1,)


@pytest.mark.parametrize("template, message", [
    ("{{ messages.append({'role': 'x'}) }}", "chat template failed"),  # the sandbox is immutable
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),  # no reaching into Python
    ("{% if %}", "does not parse"),
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
])
def test_chat_templates_run_in_a_sandbox(hf_folder, template, message):
    tokenizer = PretrainedTokenizer.load(hf_folder)
    tokenizer = PretrainedTokenizer(tokenizer.backend, tokenizer.config, chat_template=template)
    with pytest.raises(ChatTemplateError, match=message):
        tokenizer.apply_chat_template(CHAT)


def test_convert_both_ways_keeps_logits_and_records_the_source(hf_folder, tmp_path, capsys):
    checkpoint, exported = tmp_path / "ckpt", tmp_path / "exported"
    assert main(["convert", "from-hf", str(hf_folder), str(checkpoint)]) == 0
    model, tokenizer = heron.load(checkpoint)
    source, _ = heron.load(hf_folder)
    assert torch.equal(logits(model), logits(source))
    assert isinstance(tokenizer, PretrainedTokenizer) and tokenizer.chat_template == source_template(hf_folder)
    recorded = json.loads((checkpoint / "lineage.json").read_text())["source"]
    assert recorded["family"] == "llama"
    assert recorded["files"]["model.safetensors"] == sha256_file(hf_folder / "model.safetensors")

    assert main(["convert", "to-hf", str(checkpoint), str(exported)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(exported)("Hello")["input_ids"] == tokenizer.encode("Hello")


def source_template(folder):
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_generate_runs_on_a_hugging_face_folder(hf_folder, capsys):
    assert main(["generate", str(hf_folder), "--prompt", "def f", "--max-new-tokens", "5", "--temperature", "0",
                 "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["generate", str(hf_folder), "--chat", "--prompt", "Add 2 and 3.", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("<|user|>\nAdd 2 and 3.</s>\n<|assistant|>\n")


@torch.no_grad()
def test_generation_config_eos_ids_end_generation_as_in_transformers(hf_folder, tmp_path):
    """Some models list more ids that end a reply in generation_config.json than their
    tokenizer's eos_token (Llama 3 Instruct's <|eot_id|>): generation stops at any of them."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    model, tokenizer = heron.load(folder)
    prompt = tokenizer.encode("def f")
    free = Generator(model, tokenizer).generate_ids([prompt], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                            ignore_eos=True))[0]
    stop = free[3]
    generation_config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation_config, "eos_token_id": [1, stop]}))
    model, tokenizer = heron.load(folder)
    assert tokenizer.stop_ids == (1, stop)
    ours = Generator(model, tokenizer).generate_ids([prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert theirs == free[:free.index(stop) + 1] and ours == theirs[:-1]  # Heron's ids leave out the stop token
    assert main(["convert", "from-hf", str(folder), str(tmp_path / "heron")]) == 0  # kept through a conversion
    assert heron.load(tmp_path / "heron")[1].stop_ids == (1, stop)


def test_config_json_eos_ids_survive_a_round_trip_without_generation_config(hf_folder, tmp_path):
    """A folder whose config.json lists the eos ids and that has no generation_config.json:
    transformers stops at each of them, before and after Heron -> Hugging Face."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [1, 5]}))
    assert transformers.AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id == [1, 5]
    assert main(["convert", "from-hf", str(folder), str(tmp_path / "heron")]) == 0
    assert heron.load(tmp_path / "heron")[1].stop_ids == (1, 5)
    assert main(["convert", "to-hf", str(tmp_path / "heron"), str(tmp_path / "out")]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").generation_config.eos_token_id == [1, 5]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == [1, 5]


def test_an_export_without_a_tokenizer_writes_its_ids_as_null(tmp_path):
    """A key left out would read as the family's default (LLaMA's eos 2), which no token here is."""
    from heron.core import ModelConfig, Transformer
    from heron.interop import save_hf_folder

    save_hf_folder(Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2)), tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {key: written[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")} == dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id is None
    left_out = {key: value for key, value in written.items() if not key.endswith("_token_id")}
    assert transformers.LlamaConfig(**left_out).eos_token_id == 2


@pytest.mark.parametrize("change, complaint", [
    (lambda text: text + "}", "config.json: not valid JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "model_type"}),
     "config.json: model_type: None"),
    (lambda text: json.dumps({**json.loads(text), "num_attention_heads": "4"}),
     "config.json: num_attention_heads: a whole number expected, got '4'"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "hidden_size"}),
     "config.json: hidden_size: missing"),
])
def test_a_broken_config_is_named_by_every_verb(hf_folder, tmp_path, capsys, change, complaint):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "config.json").write_text(change((folder / "config.json").read_text()))
    assert main(["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert complaint in capsys.readouterr().err  # not "lineage.json: missing", as if a Heron checkpoint


def test_the_lineage_hashes_every_file_read_templates_included(hf_folder, tmp_path):
    """chat_template.jinja, transformers' named templates and generation_config.json go into the
    checkpoint: each is hashed with the rest, by its path in the folder."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools|length }}")
    (folder / "README.md").write_text("not read")
    assert main(["convert", "from-hf", str(folder), str(tmp_path / "heron")]) == 0
    recorded = json.loads((tmp_path / "heron" / "lineage.json").read_text())["source"]["files"]
    read = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "additional_chat_templates/tool_use.jinja", "generation_config.json"]
    assert recorded == {name: sha256_file(folder / name) for name in read}


def test_convert_refuses_a_template_linked_from_outside_the_folder(hf_folder, tmp_path, capsys):
    """A link would copy whatever file it names into the checkpoint's tokenizer_config.json."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").symlink_to(secret)
    assert main(["convert", "from-hf", str(folder), str(tmp_path / "heron")]) == 2
    assert f"chat_template.jinja: a link to {secret}, outside the folder" in capsys.readouterr().err
    assert not (tmp_path / "heron").exists()


def test_convert_refuses_an_existing_target_and_a_bad_source(hf_folder, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    assert main(["convert", "to-hf", str(hf_folder), str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
    assert main(["convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(hf_folder), str(tmp_path / "heron")]) == 0
    assert main(["convert", "from-hf", str(tmp_path / "heron"), str(tmp_path / "out")]) == 2  # was "model_type: None"
    assert f"{tmp_path / 'heron'}: a Heron checkpoint (lineage.json), not a Hugging Face folder" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    config = (hf_folder / "config.json").read_text()
    assert main(["convert", "from-hf", str(hf_folder), str(hf_folder)]) == 2  # into the source itself
    assert "exists and is not empty" in capsys.readouterr().err
    assert (hf_folder / "config.json").read_text() == config
    weights = (hf_folder / "model.safetensors").read_bytes()
    assert main(["convert", "to-gguf", str(hf_folder), str(hf_folder / "model.safetensors")]) == 2
    assert "model.safetensors: exists; write the GGUF file to a new path" in capsys.readouterr().err
    assert (hf_folder / "model.safetensors").read_bytes() == weights


def test_an_import_killed_before_its_audit_record_gets_it_on_a_rerun(hf_folder, tmp_path, monkeypatch,
                                                                     killed_before_the_record):
    """The rerun writes the record the killed import tried to append, once; a folder imported from
    another source is refused as any existing folder, with no record."""
    from heron.govern.audit import LOG_ENV, AuditLog
    from heron.govern.digest import artifact, json_value
    from heron.interop import convert

    monkeypatch.setenv(LOG_ENV, str(tmp_path / "audit.db"))
    log, target = AuditLog.open(tmp_path / "audit.db"), tmp_path / "imported"
    attempted = killed_before_the_record(convert, lambda: convert.import_hf(hf_folder, target))
    other = shutil.copytree(hf_folder, tmp_path / "other-source")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert.import_hf(other, target)
    assert log.records() == []
    with pytest.raises(FileExistsError, match="exists .the audit record a kill left it without: now written."):
        convert.import_hf(hf_folder, target)
    [record] = log.records(event="convert.from_hf")
    assert record.outputs == {"checkpoint": artifact(target)} and record.model_hash == attempted["model_hash"]
    assert record.inputs == attempted["inputs"] and record.inputs["source"].path == str(hf_folder.resolve())
    assert record.parameters == json_value(attempted["parameters"])
    assert record.parameters["files"]["config.json"] == sha256_file(hf_folder / "config.json")
    with pytest.raises(FileExistsError, match=f"{target}: exists; write to a new folder"):
        convert.import_hf(hf_folder, target)
    assert len(log.records()) == 1


def test_convert_to_gguf_writes_a_llama_file(hf_folder, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    target = tmp_path / "model.gguf"
    assert main(["convert", "to-gguf", str(hf_folder), str(target), "--type", "q8_0"]) == 0
    assert "(q8_0; " in capsys.readouterr().out
    reader = gguf.GGUFReader(target)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.ffn_down.weight", "output.weight"}


def test_the_exported_weights_are_as_readable_as_the_other_files(tmp_path):
    import stat

    from heron.core import ModelConfig, Transformer
    from heron.interop import save_hf_folder

    save_hf_folder(Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2)), tmp_path / "hf")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_an_exported_heron_tokenizer_still_ends_replies_at_end(tmp_path):
    """Heron ends a reply with <|end|> and a document with <|eos|>: the exported folder says so in
    generation_config.json, where transformers' generate and Heron's reader both find it."""
    from heron.align.data import encode_chats
    from heron.core import ModelConfig, Transformer
    from heron.interop import save_hf_folder

    native = train_tokenizer(["Hi there. Hello! Sure, again."] * 10, vocab_size=300, progress=False)
    model = Transformer(ModelConfig(vocab_size=native.vocab_size, d_model=16, n_layers=1, n_heads=2))
    save_hf_folder(model, tmp_path / "hf", native)
    _, exported = heron.load(tmp_path / "hf")
    assert exported.chat_stop_ids == native.chat_stop_ids == (native.end_id, native.eos_id)
    assert exported.reply_ids("Sure.") == native.reply_ids("Sure.")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "Sure."}]
    ours, theirs = encode_chats(exported, [chat], 64), encode_chats(native, [chat], 64)
    assert torch.equal(ours.ids, theirs.ids) and torch.equal(ours.mask, theirs.mask)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == [native.end_id, native.eos_id] and generation.pad_token_id == native.pad_id
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.apply_chat_template(chat, tokenize=False) == native.apply_chat_template(chat)
