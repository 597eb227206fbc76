from ref import *
n=0
for dtype in ['f32','bf16','f16']:
    for D in [8,16,24,32,40]:
        for (lens,nh,nkv,cap,w) in [([1,2,17,63,64,65],4,2,None,None),([70,3],4,1,3.0,5),([66],2,2,50.0,64)]:
            n+=1
            got,ref,dt=run_emu(dtype,lens,nh,nkv,D,D**-0.5,cap,w,'generic','generic','generic',seed=n)
            report(got,ref,f'{dtype} D{D} {lens} {nh}/{nkv} cap{cap} w{w}')
