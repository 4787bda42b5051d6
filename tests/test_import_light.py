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


def pipeline_imports(module: str) -> set[str]:
    """The pipeline.* modules `module` imports anywhere in its file (top level or inside functions)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("pipeline.") and
                  (Path(path.parents[1]) / (n.replace(".", "/") + ".py")).is_file()}
    return found


def test_the_stage_never_imports_the_job():
    """The job (pipeline.run) builds on the decode stage (pipeline.stage), never the reverse: nothing the
    stage reaches, even through imports inside functions, imports pipeline.run."""
    seen, todo = set(), ["pipeline.stage"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(pipeline_imports(module))
    assert "pipeline.run" not in seen, sorted(seen)
    assert {"pipeline.facts", "pipeline.resources", "pipeline.actor"} <= seen  # the walk does follow imports
    code = "import sys, pipeline.stage; print('pipeline.run' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
