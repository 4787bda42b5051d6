"""`import prophet` stays light: no Ray, no DeepSpeed (they live in pipeline/ and jobs/ only)."""
import json
import subprocess
import sys


def test_import_prophet_loads_neither_ray_nor_deepspeed():
    code = ("import sys, prophet, prophet.scripted, prophet.reference; "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'deepspeed'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
