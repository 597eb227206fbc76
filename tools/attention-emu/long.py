import os
import sys
from ref import *
cases = [
    ('bf16', [1000], 2, 1, 256, 1/16, 50.0, None, 'fa_d256', 'd256', 'd256'),
    ('bf16', [700, 300], 4, 1, 128, 128**-0.5, None, None, 'fa_d128', 'd128', 'd128'),
    ('f16', [1000], 2, 1, 256, 1/16, 50.0, 300, 'fa_d256_n32', 'd256_n32_m16', 'd256_m32'),
    ('bf16', [1000], 2, 2, 64, 0.125, 3.0, 65, 'fa_d64', 'd64', 'd64'),
    ('f16', [600], 2, 1, 128, 128**-0.5, None, None, 'fa_d128', 'd128_s1', 'd128_s1'),
]
for i, c in enumerate(cases):
    got, ref, dt = run_emu(*c, late=i % 2, seed=100 + i, workdir=os.path.join(OUT, f'long{i}'))
    report(got, ref, f'{c} ({dt:.0f}s)'); sys.stdout.flush()
# f16 with a small upstream gradient: dS in the f16 subnormal range
got, ref, dt = run_emu('f16', [1000], 2, 1, 64, 0.125, None, None, 'fa_d64', 'd64', 'd64', seed=7, dout_scale=1e-3, workdir=os.path.join(OUT, 'long9'))
report(got, ref, f'f16 dout 1e-3 ({dt:.0f}s)')
got, ref, dt = run_emu('bf16', [1000], 2, 1, 64, 0.125, None, None, 'fa_d64', 'd64', 'd64', seed=7, dout_scale=1e-3, workdir=os.path.join(OUT, 'long10'))
report(got, ref, f'bf16 dout 1e-3 ({dt:.0f}s)')
