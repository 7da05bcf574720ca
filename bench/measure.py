"""What the benchmarks share: the wrapper that measures a child process's own peak RSS.

Runs the measured program inside this wrapper and, at exit, writes the process's own VmHWM (peak RSS of its
address space, /proc/self/status). Not ru_maxrss: on Linux a child's ru_maxrss starts from the parent's RSS
at fork time (it survives exec), which would charge the benchmark's own memory to it.
Usage: ``python -c HWM_WRAPPER OUT_FILE KIND TARGET ARGS...`` with KIND ``-m`` (a module), ``path`` (a
script file) or anything else (TARGET is Python source).
"""

HWM_WRAPPER = """
import atexit, runpy, sys
out, kind, target = sys.argv[1:4]
del sys.argv[1:4]
def dump():
    with open('/proc/self/status') as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(str(kib * 1024))
atexit.register(dump)
if kind == '-m':
    sys.argv[0] = target
    runpy.run_module(target, run_name='__main__', alter_sys=True)
elif kind == 'path':
    sys.argv[0] = target
    sys.path.insert(0, target.rsplit('/', 1)[0])
    runpy.run_path(target, run_name='__main__')
else:
    sys.argv[0] = '-c'
    exec(compile(target, '<bench>', 'exec'), {'__name__': '__main__'})
"""
