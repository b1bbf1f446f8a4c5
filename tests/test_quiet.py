"""fastlora makes no third-party noise: importing it and injecting LoRA into a float model import no bitsandbytes
(whose import prints notes about optional backends, issue 19) and print nothing."""

import subprocess
import sys

SCRIPT = """
import sys, torch, fastlora
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
fastlora.inject(model, r=2, target_modules="all-linear")
model(torch.randn(3, 16)).sum().backward()
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
"""


def test_import_and_inject_are_quiet():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bitsandbytes imported: False", proc.stdout
    assert proc.stderr == "", proc.stderr
