"""The agent raises its soft limit on open files to the hard one (it keeps a socket in every job's network
namespace); a child started before that keeps the limit it was given. Run in a subprocess with a low soft
limit, so this test process is not changed."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap


def test_the_agent_raises_its_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = textwrap.dedent("""
        import resource
        from nodeagent.main import _raise_fd_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        _raise_fd_limit()
        print(*resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    soft, new_hard = map(int, out.stdout.split())
    assert new_hard == hard and soft == (hard if hard != resource.RLIM_INFINITY else 1 << 20) and soft > 256
