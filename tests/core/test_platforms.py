"""ember.platforms on the host: giving back a thread's OpenMP workers."""
import os
import subprocess
import sys
import textwrap


def test_release_host_threads_ends_the_callers_openmp_workers():
    # A fresh process with 3 OpenMP threads: a parallel op leaves 2 workers parked; releasing
    # them must end those threads, and the next parallel op must still work (a new team is made).
    code = textwrap.dedent("""
        import os, torch
        from ember import platforms
        torch.set_num_threads(3)
        def threads(): return len(os.listdir("/proc/self/task"))
        before = threads()
        x = torch.randn(1 << 22)
        ref = x.exp()
        parked = threads()
        platforms.release_host_threads()
        released = threads()
        assert torch.equal(x.exp(), ref)
        print(torch.get_num_threads(), before, parked, released, threads())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    team, before, parked, released, again = map(int, out.stdout.split())
    assert team == 3 and parked == before + 2, (team, before, parked)
    assert released == before, (parked, released)
    assert again == parked, (released, again)
