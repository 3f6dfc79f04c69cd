"""Oracle test: dmsrt's tokenizer against llama.cpp (llama-cpp-python) on the default model.

Every string of a varied corpus (prose in many scripts, code, numbers, emoji, whitespace runs,
inline special tokens, seeded random mixes) must encode to exactly the ids llama.cpp gives, with
and without special-token parsing, and decode back to the original text. The same is checked
for the other pre-tokenizer families (llama-bpe, qwen2, gpt2) by giving llama.cpp vocab-only
copies of the model whose `tokenizer.ggml.pre` names that family, and `dmsrt tokenize --pre`.
Chat templates are compared with the Jinja source rendered by jinja2 (the reference
implementation) and with llama.cpp's built-in ChatML.

Environment: DMSRT_BIN (the dmsrt binary), DMSRT_MODEL (the GGUF model). Tests skip with a
reason when the binary, the model, llama_cpp, gguf or jinja2 is missing. Run directly
(`python3 test_tokenizer.py`) it runs itself under pytest, exiting 77 (skip) without pytest.
"""
import ctypes
import functools
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
SOURCE_ROOT = os.path.dirname(os.path.dirname(HERE))

try:
    import pytest
except ImportError:  # only the __main__ path below runs without pytest
    pytest = None


def _bin():
    return os.environ.get("DMSRT_BIN", os.path.join(SOURCE_ROOT, "build", "bin", "dmsrt"))


def _model():
    return os.environ.get("DMSRT_MODEL",
                          os.path.join(SOURCE_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def _require(module):
    try:
        return __import__(module)
    except ImportError:
        pytest.skip("python module %s is not installed" % module)


# ---- corpus -------------------------------------------------------------------------------------

def _generated_strings():
    rng = random.Random(20240315)
    out = []
    # Digit runs of every length up to 40, alone, after a space, inside words.
    for n in range(1, 41):
        digits = "".join(str((i * 7 + 3) % 10) for i in range(n))
        out += [digits, " " + digits, "x" + digits + "y", digits + ".5"]
    # Whitespace shapes.
    for ws in [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t\n ",
               "\u00a0", "\u3000\u3000", "\u2009 ", "\u200b"]:
        out += [ws, "a" + ws, ws + "a", "a" + ws + "b", "a" + ws + "1", "1" + ws + "!", ws * 3]
    # Contractions in all cases, with and without a leading word.
    for c in ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]:
        for v in [c, c.upper(), c[0] + c[1:].capitalize()]:
            out += [v, "it" + v, "IT" + v + " now", "'" + v, v + "'"]
    # Seeded random mixtures of pieces from every class the pre-tokenizers care about.
    pieces = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u200b",
              "\u0085", "\u2028", "a", "Z", "é", "ß", "Ω", "ж", "日", "本", "한", "ا", "ש", "ก",
              "\u0301", "\u0308", "0", "7", "٣", "½", "²", "Ⅻ", "'", "'s", "'S", "'ll", "'LL",
              "'re", "'Ve", "'d", "'T", "'m", "!", "?", ".", ",", "-", "_", "(", ")", "{", "}",
              "<", ">", "|", "$", "+", "=", "^", "`", "~", "😀", "👍🏽", "🇫🇷",
              "\U0001F9D1\u200D\U0001F4BB", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
              "<repo_name>", "<|im_start", "im_end|>", "hello", "World", "THE", "don't",
              "12345", "3.14", "0x1F", "\\n", "\x00", "\x1f", "\x7f", "\ufeff", "\ufffd",
              "\U00010400", "\U00031350", "\U0001FAE9"]
    for _ in range(600):
        n = rng.randint(1, 24)
        out.append("".join(rng.choice(pieces) for _ in range(n)))
    return out


def corpus_strings():
    strings = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name), encoding="utf-8", newline="") as f:
            text = f.read()
        strings.append(text)                                            # whole file
        strings += [p for p in text.split("\n\n") if p]                 # paragraphs
        strings += [l for l in text.split("\n") if l]                   # lines
        strings += [l + "\n" for l in text.split("\n")[:5]]             # lines with newline
    strings += _generated_strings()
    return strings


# ---- helpers ------------------------------------------------------------------------------------

def run_dmsrt(args, stdin=None, tokenizer_dir=None):
    source = ["--tokenizer-dir", tokenizer_dir] if tokenizer_dir else ["--model", _model()]
    proc = subprocess.run([_bin(), "tokenize"] + source + args,
                          input=stdin.encode("utf-8") if stdin is not None else None,
                          capture_output=True, timeout=300)
    return proc


def dmsrt_encode(strings, special, pre=None, tokenizer_dir=None):
    extra = ["--pre", pre] if pre else []
    if not special:
        extra.append("--no-special")
    stdin = "".join(json.dumps(s) + "\n" for s in strings)
    proc = run_dmsrt(["--jsonl", "-"] + extra, stdin, tokenizer_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(strings)
    return [json.loads(l) for l in lines]


def dmsrt_decode(id_lists):
    stdin = "".join(json.dumps(ids) + "\n" for ids in id_lists)
    proc = run_dmsrt(["--decode-jsonl", "-"], stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(l) for l in proc.stdout.decode().split("\n")[:-1]]


def _report(capsys, msg):
    with capsys.disabled():
        print("\n[oracle_tokenizer] " + msg)


@functools.lru_cache(maxsize=None)
def _reader(path):
    """The parsed GGUF (slow to parse: read once per run)."""
    gguf = _require("gguf")
    return gguf.GGUFReader(path)


def _vocab_only_copy(src, dst, pre):
    """Writes a tensor-less GGUF with the metadata of `src` and tokenizer.ggml.pre = pre."""
    gguf = _require("gguf")
    r = _reader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = pre if name == "tokenizer.ggml.pre" else f.contents()
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, val, vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, val, vt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")


def _write_hf_tokenizer(src, out_dir, family):
    """Writes tokenizer.json + tokenizer_config.json with the vocabulary of GGUF `src`, in the
    shape Hugging Face files of `family` have."""
    r = _reader(src)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    if family == "smollm":
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif family == "gpt2":
        pre = byte_level
    else:
        pattern = LLAMA3_SPLIT if family == "llama-bpe" else QWEN2_SPLIT
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
             "invert": False}, dict(byte_level, use_regex=False)]}
    doc = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": types[i] == 3}
                         for i, t in enumerate(tokens) if types[i] in (3, 4)],
        "pre_tokenizer": pre,
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    bos = int(r.fields["tokenizer.ggml.bos_token_id"].contents())
    eos = int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    cfg = {"bos_token": tokens[bos], "eos_token": {"content": tokens[eos]},
           "add_bos_token": False,
           "chat_template": r.fields["tokenizer.chat_template"].contents()}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)


if pytest is not None:

    @pytest.fixture(scope="module")
    def env():
        if not os.path.isfile(_bin()):
            pytest.skip("dmsrt binary not found at %s (set DMSRT_BIN)" % _bin())
        if not os.path.isfile(_model()):
            pytest.skip("model not found at %s (set DMSRT_MODEL or run the setup script)" %
                        _model())
        return True

    @pytest.fixture(scope="module")
    def llama_cpp(env):
        return _require("llama_cpp")

    @pytest.fixture(scope="module")
    def ref(llama_cpp):
        return llama_cpp.Llama(_model(), vocab_only=True, verbose=False)

    @pytest.fixture(scope="module")
    def strings():
        s = corpus_strings()
        assert len(s) >= 200
        return s

    # ---- encoding ------------------------------------------------------------------------------

    @pytest.mark.parametrize("special", [True, False], ids=["parse_special", "no_special"])
    def test_encode_matches_llama_cpp(ref, strings, special, capsys):
        ours = dmsrt_encode(strings, special)
        mismatches = []
        n_tokens = 0
        for s, got in zip(strings, ours):
            want = ref.tokenize(s.encode("utf-8"), add_bos=False, special=special)
            n_tokens += len(want)
            if got != want:
                mismatches.append((s, want, got))
        _report(capsys, "smollm special=%s: %d strings, %d tokens, %d mismatches" %
                (special, len(strings), n_tokens, len(mismatches)))
        assert not mismatches, "first mismatch: %r\n want %s\n got  %s" % mismatches[0]

    @pytest.fixture(scope="module")
    def variant(llama_cpp, tmp_path_factory):
        """llama.cpp on a vocab-only copy of the model whose pre-tokenizer is `pre`."""
        made = {}

        def get(pre):
            if pre not in made:
                path = str(tmp_path_factory.mktemp("vocab") / ("vocab-%s.gguf" % pre))
                _vocab_only_copy(_model(), path, pre)
                made[pre] = llama_cpp.Llama(path, vocab_only=True, verbose=False)
            return made[pre]
        return get

    @pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
    def test_other_pre_tokenizers_match_llama_cpp(variant, strings, pre, capsys):
        other = variant(pre)
        for special in (True, False):
            ours = dmsrt_encode(strings, special, pre=pre)
            bad = [(s, w, g) for s, g in zip(strings, ours)
                   for w in [other.tokenize(s.encode("utf-8"), add_bos=False,
                                            special=special)] if g != w]
            _report(capsys, "%s special=%s: %d strings, %d mismatches" %
                    (pre, special, len(strings), len(bad)))
            assert not bad, "first mismatch: %r\n want %s\n got  %s" % bad[0]

    @pytest.mark.parametrize("family", ["smollm", "llama-bpe", "qwen2", "gpt-2"])
    def test_tokenizer_json_matches_llama_cpp(ref, variant, strings, family, capsys):
        # The Hugging Face path: the same vocabulary as tokenizer.json files, loaded by
        # LoadTokenizerJson (family recognised from the pre_tokenizer), against llama.cpp.
        with tempfile.TemporaryDirectory() as tmp:
            _write_hf_tokenizer(_model(), tmp, "gpt2" if family == "gpt-2" else family)
            other = ref if family == "smollm" else variant(family)
            ours = dmsrt_encode(strings, True, tokenizer_dir=tmp)
            bad = [(s, w, g) for s, g in zip(strings, ours)
                   for w in [other.tokenize(s.encode("utf-8"), add_bos=False, special=True)]
                   if g != w]
            _report(capsys, "tokenizer.json %s: %d strings, %d mismatches" %
                    (family, len(strings), len(bad)))
            assert not bad, "first mismatch: %r\n want %s\n got  %s" % bad[0]
            # The chat template travels through tokenizer_config.json too.
            conv = os.path.join(tmp, "conv.json")
            with open(conv, "w", encoding="utf-8") as f:
                json.dump([{"role": "user", "content": "Hi"}], f)
            a = run_dmsrt(["--chat", conv, "--render"], tokenizer_dir=tmp)
            b = run_dmsrt(["--chat", conv, "--render"])
            assert a.returncode == 0 and a.stdout == b.stdout, a.stderr.decode()

    @pytest.mark.parametrize("special", [True, False], ids=["parse_special", "no_special"])
    def test_decode_round_trip(ref, strings, special, capsys):
        ids = [ref.tokenize(s.encode("utf-8"), add_bos=False, special=special) for s in strings]
        texts = dmsrt_decode(ids)
        bad = [(s, t) for s, t in zip(strings, texts) if s != t]
        _report(capsys, "decode round trip special=%s: %d strings, %d mismatches" %
                (special, len(strings), len(bad)))
        assert not bad, "first mismatch: %r -> %r" % bad[0]

    def test_invalid_utf8_matches_llama_cpp(ref):
        # Bytes that are not UTF-8 become U+FFFD per offending byte, as in llama.cpp.
        cases = [b"\xff\xfe abc", b"caf\xc3", b"\xe6\x97 x", b"\x80\x80hello", b"ok \xf0\x9f\x98",
                 b"\xc3\xa9\xc3", b"\xf8\x88\x80\x80\x80z", b"\xed\xa0\x80 surrogate"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bytes.bin")
            for c in cases:
                with open(path, "wb") as f:
                    f.write(c)
                proc = run_dmsrt(["--file", path])
                assert proc.returncode == 0, proc.stderr.decode()
                got = [int(x) for x in proc.stdout.split()]
                assert got == ref.tokenize(c, add_bos=False, special=True), c

    def test_cli_text_json_and_decode(env):
        text = "Hello, world! It's 2024.\n<|im_end|>"
        plain = run_dmsrt(["--text", text])
        assert plain.returncode == 0, plain.stderr.decode()
        ids = [int(x) for x in plain.stdout.decode().split()]
        as_json = run_dmsrt(["--text", text, "--json"])
        assert as_json.returncode == 0
        j = json.loads(as_json.stdout.decode())
        assert j["ids"] == ids and j["count"] == len(ids)
        assert 2 in ids  # <|im_end|> parsed as its special token
        dec = run_dmsrt(["--decode", " ".join(map(str, ids))])
        assert dec.returncode == 0 and dec.stdout.decode() == text
        no_special = run_dmsrt(["--text", text, "--no-special"])
        assert 2 not in [int(x) for x in no_special.stdout.decode().split()]
        bad = run_dmsrt(["--text", "x", "--bogus"])
        assert bad.returncode == 2 and b"--bogus" in bad.stderr
        missing = run_dmsrt([])
        assert missing.returncode == 2
        unknown_pre = run_dmsrt(["--text", "x", "--pre", "nonesuch"])
        assert unknown_pre.returncode == 1 and b"nonesuch" in unknown_pre.stderr

    # ---- chat templates ------------------------------------------------------------------------

    LLAMA3_TEMPLATE = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}")
    QWEN25_TEMPLATE = (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if (message.role == \"user\") or "
        "(message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    QWEN3_TEMPLATE = (
        "{%- if messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if message.role == 'system' and loop.first %}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
        "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}")

    CONVERSATIONS = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What's 2+2?"}],
        [{"role": "user", "content": "  padded content \n"},
         {"role": "assistant", "content": "\tok\n\n"}],
        [{"role": "user", "content": "Unicode: 日本語 😀 and a literal <|im_end|> inside"}],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
         {"role": "user", "content": "third\nwith\nlines"}],
    ]

    def _render_jinja(template, messages, add_generation_prompt, bos_token):
        jinja2 = _require("jinja2")
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token="")

    def _model_template_and_bos():
        r = _reader(_model())
        tmpl = r.fields["tokenizer.chat_template"].contents()
        bos = r.fields["tokenizer.ggml.tokens"].contents()[
            int(r.fields["tokenizer.ggml.bos_token_id"].contents())]
        return tmpl, bos

    def _dmsrt_render(messages, add_generation_prompt, template=None, tmp=None):
        conv = os.path.join(tmp, "conv.json")
        with open(conv, "w", encoding="utf-8") as f:
            json.dump(messages, f)
        args = ["--chat", conv, "--render"]
        if not add_generation_prompt:
            args.append("--no-generation-prompt")
        if template is not None:
            path = os.path.join(tmp, "template.jinja")
            with open(path, "w", encoding="utf-8") as f:
                f.write(template)
            args += ["--template", path]
        return run_dmsrt(args)

    @pytest.mark.parametrize("family", ["model", "llama3", "qwen25", "qwen3"])
    def test_chat_template_matches_jinja(env, family, capsys):
        model_tmpl, bos = _model_template_and_bos()
        template = {"model": None, "llama3": LLAMA3_TEMPLATE, "qwen25": QWEN25_TEMPLATE,
                    "qwen3": QWEN3_TEMPLATE}[family]
        n = 0
        with tempfile.TemporaryDirectory() as tmp:
            for messages in CONVERSATIONS:
                for gen in (True, False):
                    want = _render_jinja(template or model_tmpl, messages, gen, bos)
                    proc = _dmsrt_render(messages, gen, template, tmp)
                    assert proc.returncode == 0, proc.stderr.decode()
                    assert proc.stdout.decode("utf-8") == want, (family, messages, gen)
                    n += 1
        _report(capsys, "chat template %s: %d renders identical to jinja2" % (family, n))

    def test_chat_template_matches_llama_cpp_chatml(llama_cpp, env):
        # llama.cpp's built-in ChatML has no default system turn: compare where one is given.
        with tempfile.TemporaryDirectory() as tmp:
            for messages in CONVERSATIONS:
                if messages[0]["role"] != "system":
                    continue
                arr = (llama_cpp.llama_chat_message * len(messages))()
                keep = []
                for i, m in enumerate(messages):
                    role, content = m["role"].encode(), m["content"].encode()
                    keep += [role, content]
                    arr[i].role, arr[i].content = role, content
                buf = ctypes.create_string_buffer(1 << 16)
                n = llama_cpp.llama_chat_apply_template(b"chatml", arr, len(messages), True,
                                                        buf, len(buf))
                assert n > 0
                want = buf.raw[:n].decode("utf-8")
                proc = _dmsrt_render(messages, True, None, tmp)
                assert proc.returncode == 0, proc.stderr.decode()
                assert proc.stdout.decode("utf-8") == want

    def test_chat_ids_match_llama_cpp(ref, env):
        with tempfile.TemporaryDirectory() as tmp:
            for messages in CONVERSATIONS:
                rendered = _dmsrt_render(messages, True, None, tmp).stdout.decode("utf-8")
                conv = os.path.join(tmp, "conv.json")
                proc = run_dmsrt(["--chat", conv])
                assert proc.returncode == 0, proc.stderr.decode()
                got = [int(x) for x in proc.stdout.decode().split()]
                assert got == ref.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)

    def test_unknown_chat_template_is_an_error(env):
        with tempfile.TemporaryDirectory() as tmp:
            proc = _dmsrt_render(CONVERSATIONS[0], True, "{{ messages[0]['content'] }}", tmp)
            assert proc.returncode == 1
            assert b"unrecognised chat template" in proc.stderr
            assert b"messages[0]" in proc.stderr


if __name__ == "__main__":
    if pytest is None:
        print("SKIP: pytest is not installed (pip install pytest)")
        sys.exit(77)
    sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", os.path.abspath(__file__)] +
                         sys.argv[1:]))
