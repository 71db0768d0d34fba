"""``python -m specops generate`` on a tiny random Qwen2 model and a word-level tokenizer saved
to a temporary folder: every drafting mode runs, greedy output equals plain decoding, the
streamed text equals the decoded output, and bad options or mismatched tokenizers end with a
message and a non-zero status, not a traceback."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from specops import cli

# Byte-level BPE like Qwen's (transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer,
# which rebuilds it from vocab and merges, so a word-level tokenizer would not survive).
CORPUS = ["def f(x):\n    return x + 1\n", "def g(y):\n    return y * 2\n",
          "for i in range(10):\n    print(i)\n", "s == s[::-1]  # é, ü, 中文\n"]
PROMPT = "def f(x):\n    return x + 1\ndef g(y):\n    return y * 2\ndef f(y):\n"


def save_tokenizer(folder, corpus, vocab_size):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def save_model(folder, vocab, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.25, eos_token_id=1,
                         bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A target, a different draft with the same tokenizer, and a model of another tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    vocab = save_tokenizer(root / "target", CORPUS, 300)
    save_model(root / "target", vocab, seed=0)
    save_tokenizer(root / "draft", CORPUS, 300)
    save_model(root / "draft", vocab, seed=1)
    other = save_tokenizer(root / "other", [line.upper() for line in CORPUS], 300)
    save_model(root / "other", other, seed=2)
    return {name: str(root / name) for name in ("target", "draft", "other")}


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def base(folders, draft="draft"):
    return ["generate", PROMPT, "--target", folders["target"], "--draft", folders[draft],
            "--max-new-tokens", "8", "--no-chat-template"]


MODES = {"chain-auto": [], "chain-3": ["--num-draft", "3", "--threads", "1"],
         "lookup": ["--prompt-lookup"], "hybrid": ["--hybrid"], "tree": ["--tree", "2,2,4"],
         "plain": ["--draft", "none"],
         "draft-fp32": ["--draft-dtype", "float32", "--num-draft", "2"]}


@pytest.mark.parametrize("mode", MODES)
def test_greedy_modes_match_plain_decoding(folders, capsys, mode):
    argv = base(folders)
    if "--draft" in MODES[mode]:
        argv = argv[:4] + argv[6:]  # --draft none replaces the draft folder
    threads = torch.get_num_threads()
    code, out, err = run(capsys, *argv, *MODES[mode], "--compare", "--json")
    assert code == 0, err
    assert torch.get_num_threads() == threads  # --threads is undone on return
    report = json.loads(out)
    assert 1 <= report["stats"]["new_tokens"] <= 8
    assert report["plain"]["identical"] is True
    assert report["plain"]["speedup"] > 0
    if mode == "lookup":
        assert "--draft is not loaded" in err


def test_streamed_text_equals_decoded_output_and_summary_on_stderr(folders, capsys):
    code, out, err = run(capsys, *base(folders), "--num-draft", "2", "--json")
    assert code == 0, err
    text = json.loads(out)["text"]
    assert text

    code, out, err = run(capsys, *base(folders), "--num-draft", "2", "--compare")
    assert code == 0, err
    assert out == text + "\n"
    for expected in ["tokens/s", "tokens emitted per step", "acceptance by draft position",
                     "draft lengths chosen", "time: prefill", "speedup", "outputs identical"]:
        assert expected in err


def test_a_warm_up_call_comes_first_unless_skipped(folders, capsys, monkeypatch):
    """The timed run follows one short untimed call of the same generator (weights paged in,
    costs measured: the timed run measures nothing), which ``--no-warmup`` skips."""
    from specops import loop
    calls = []
    original = loop.SpeculativeGenerator.generate

    def recording(self, input_ids, *args, max_new_tokens, **kwargs):
        out = original(self, input_ids, *args, max_new_tokens=max_new_tokens, **kwargs)
        calls.append((id(self), max_new_tokens, out.stats.warmup_seconds))
        return out

    monkeypatch.setattr(loop.SpeculativeGenerator, "generate", recording)
    code, out, err = run(capsys, *base(folders), "--json")
    assert code == 0, err
    assert [c[1] for c in calls] == [2, 8] and calls[0][0] == calls[1][0]
    assert calls[0][2] > 0 and calls[1][2] == 0
    assert json.loads(out)["warmup_seconds"] > 0 and "specops: untimed warm-up call" in err
    calls.clear()
    code, out, err = run(capsys, *base(folders), "--json", "--no-warmup")
    assert code == 0, err
    assert [c[1] for c in calls] == [8] and calls[0][2] > 0
    assert json.loads(out)["warmup_seconds"] is None and "warm-up" not in err


def test_sampling_runs_and_is_not_compared_token_for_token(folders, capsys):
    code, out, err = run(capsys, *base(folders), "--temperature", "0.9", "--top-k", "10",
                         "--top-p", "0.9", "--seed", "3", "--compare", "--json")
    assert code == 0, err
    assert json.loads(out)["plain"]["identical"] is None


def test_prompt_from_stdin_and_chat_template(folders, capsys, monkeypatch, tmp_path):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    argv = [a for a in base(folders) if a != PROMPT]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    assert json.loads(out)["prompt"] == PROMPT

    from transformers import AutoTokenizer
    chat = tmp_path / "chat"
    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    tokenizer.chat_template = "{% for m in messages %}# {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(chat)
    ids = cli.encode(AutoTokenizer.from_pretrained(chat), "x + 1", chat=True)
    assert tokenizer.decode(ids[0]) == "# x + 1\n"
    assert tokenizer.decode(cli.encode(tokenizer, "x + 1", chat=False)[0]) == "x + 1"


def fake_output(new_tokens, seconds):
    from types import SimpleNamespace

    stats = {"new_tokens": len(new_tokens), "total_seconds": seconds,
             "tokens_per_second": len(new_tokens) / seconds}
    return SimpleNamespace(sequences=torch.tensor([[7, 8] + new_tokens]),
                           num_new_tokens=[len(new_tokens)],
                           stats=SimpleNamespace(as_dict=lambda: stats))


def test_compare_reports_speedup_and_the_first_difference():
    report, lines = cli.compare(fake_output([1, 2, 3, 4], 1.0), fake_output([1, 2, 3, 4], 2.0),
                                greedy=True)
    assert report["speedup"] == 2.0 and report["identical"] is True
    assert lines[-1] == "speedup 2.00x over plain decoding, outputs identical"
    report, lines = cli.compare(fake_output([1, 2, 9, 4], 1.0), fake_output([1, 2, 3, 4], 4.0),
                                greedy=True)
    assert report["identical"] is False
    assert lines[-1] == "speedup 4.00x over plain decoding, OUTPUTS DIFFER from new token 2 on"
    report, _ = cli.compare(fake_output([5], 1.0), fake_output([6], 1.0), greedy=False)
    assert report["identical"] is None


class ByteTokenizer:
    """Token i is byte i: enough to split one character across two tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_holds_back_a_split_character():
    import io

    out = io.StringIO()
    stream = cli.TextStream(ByteTokenizer(), out=out)
    a, e_acute = list("a".encode()), list("é".encode())  # é is two bytes
    stream([a + e_acute[:1]])
    assert out.getvalue() == "a"
    stream([e_acute[1:]])
    assert out.getvalue() == "aé"
    assert stream.close() == "aé"


@pytest.mark.parametrize("bad, message", [
    (["--num-draft", "many"], "--num-draft must be an integer or 'auto'"),
    (["--num-draft", "-1"], "--num-draft must be in 0..64"),
    (["--tree", "4,4"], "--tree takes DEPTH,TOPK,NODES"),
    (["--tree", "2,2,99"], "num_nodes must be in"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--threads", "-2"], "--threads must be >= 1"),
    (["--draft", "none", "--hybrid"], "--hybrid needs a draft model"),
    (["--prompt-lookup", "--hybrid"], "not allowed with argument"),
    (["--draft-dtype", "float8"], "invalid choice"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--device", "nonsense"], "--device 'nonsense' cannot be used here"),
    (["--device", "cuda:99"], "--device 'cuda:99' cannot be used here"),   # no GPU 99 anywhere
])
def test_bad_options_exit_2_with_a_message(folders, capsys, bad, message):
    code, out, err = run(capsys, *base(folders), *bad)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_mismatched_tokenizers_and_unknown_models_are_refused(folders, capsys):
    code, out, err = run(capsys, *base(folders, draft="other"))
    assert code == 2
    assert "another tokenizer than the target" in err and "--prompt-lookup" in err

    code, out, err = run(capsys, "generate", "hi", "--target", "no-such-model")
    assert code == 1
    assert "cannot load the target 'no-such-model'" in err and "neither a bundled model" in err


def test_no_subcommand_prints_help(capsys):
    code, out, err = run(capsys)
    assert code == 0
    assert "generate" in out and "usage" in out


def test_chat_replies_end_at_either_chatml_marker(folders):
    from specops.pretrained import load_model

    model, tokenizer = load_model(folders["target"])
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    vocab = tokenizer.get_vocab()
    assert cli.eos_ids(model, tokenizer) == sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]})


def test_tree_size_is_cost_aware_unless_a_draft_length_is_given():
    parser = cli.build_parser()
    options = cli.check_options(parser.parse_args(["generate", "x", "--tree", "2,2,4"]))
    assert options["tree"].adaptive and options["num_draft_tokens"] is None
    options = cli.check_options(parser.parse_args(["generate", "x", "--tree", "2,2,4",
                                                   "--num-draft", "3"]))
    assert not options["tree"].adaptive and options["tree"].num_nodes == 4


def test_compile_flag_reaches_the_generators(folders, capsys, monkeypatch):
    """--compile: the generator (and the --compare plain one) run with compile=True."""
    import specops
    seen = []
    original = specops.SpeculativeGenerator.__init__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("compile"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(specops.SpeculativeGenerator, "__init__", recording)
    code, out, err = run(capsys, *base(folders), "--num-draft", "2", "--compare", "--json")
    assert code == 0, err
    code, out, err = run(capsys, *base(folders), "--num-draft", "2", "--compare", "--json",
                         "--compile")
    assert code == 0, err
    assert seen == [False, False, True, True]
