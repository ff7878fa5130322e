import subprocess
import sys
from pathlib import Path

from offbeat.v1 import rollout_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_committed_bindings_match_the_protos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_token_ids_and_logprobs_are_packed():
    c = rollout_pb2.RolloutCompletion(completion_token_ids=list(range(1000)), logprobs=[-0.5] * 1000)
    # packed: one tag per field, not per element (~4 bytes/float, <=2 bytes/small int)
    assert len(c.SerializeToString()) < 1000 * 2 + 1000 * 4 + 20
