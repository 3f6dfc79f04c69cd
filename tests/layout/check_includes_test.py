#!/usr/bin/env python3
"""The include checker refuses a wrong-way include and accepts the right-way ones (on a scratch
tree, so the real tree is never edited)."""
import pathlib
import subprocess
import sys
import tempfile

CHECK = pathlib.Path(__file__).with_name("check_includes.py")


def run(files: dict) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as d:
        for rel, text in files.items():
            p = pathlib.Path(d, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        return subprocess.run([sys.executable, str(CHECK), d], capture_output=True, text=True)


def main() -> int:
    ok = run({"runtime/engine/e.h": '#include "runtime/backend/backend.h"\n#include <vector>\n',
              "runtime/backend/b.h": '#include "runtime/kv/kv_cache.h"\n#include "kernels/cpu/ops.h"\n',
              "runtime/kv/k.h": '#include "runtime/kv/block_pool.h"\n#include "absl/status/status.h"\n'})
    assert ok.returncode == 0, ok.stdout
    cases = {
        "runtime/kv/k.h": '#include "runtime/engine/engine.h"\n',
        "runtime/model/m.cc": '  #  include "runtime/tokenizer/tokenizer.h"\n',
        "kernels/cpu/x.cc": '#include "parallel/comm.h"\n',
        "parallel/p.h": '#include "runtime/model/model.h"\n',
        "runtime/backend/b.cc": '#include "runtime/engine/sampler.h"\n',
        "runtime/engine/e.cc": '#include "launch/args.h"\n',
    }
    for rel, text in cases.items():
        r = run({rel: text})
        assert r.returncode == 1 and rel in r.stdout, (rel, r.returncode, r.stdout)
    print(f"check_includes: accepts the right-way tree and refuses {len(cases)} wrong-way includes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
