//! The optimiser family: AdamW over f32 master copies of the trainable tensors, and the
//! global gradient norm for clipping — one launch each over all tensors on a GPU (kernels in
//! kernels/optim.cu), plain loops on the CPU (the reference, in torch's operation order).

mod cpu;
mod cuda;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::cuda::CudaBuffer;
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// AdamW's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// f32 values on the host or a GPU.
enum Store {
    Cpu(Vec<f32>),
    Cuda(CudaBuffer),
}

struct Slot {
    shape: Vec<usize>,
    master: Store,
    m: Store,
    v: Store,
}

/// AdamW state: f32 master weights and moments of every trainable tensor, on its device.
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimiser steps taken.
    pub step: u64,
    device: Device,
    slots: Vec<Slot>,
}

fn f32_store(t: &Tensor) -> Result<Store> {
    Ok(match t.device() {
        Device::Cpu => Store::Cpu(t.to_f32_vec()?),
        Device::Cuda(_) => {
            let f = crate::ops::elementwise::cast(t, DType::F32)?;
            Store::Cuda(f.cuda_storage()?.buf.duplicate()?)
        }
    })
}

fn zeros_like(t: &Tensor) -> Result<Store> {
    Ok(match t.device() {
        Device::Cpu => Store::Cpu(vec![0.0; t.elem_count()]),
        Device::Cuda(i) => Store::Cuda(crate::cuda::device(i)?.alloc_zeros(t.elem_count() * 4)?),
    })
}

impl AdamW {
    /// Masters start as f32 copies of `params`; moments at zero.
    pub fn new(cfg: AdamWConfig, params: &[Tensor]) -> Result<Self> {
        let device = params.first().map(Tensor::device).unwrap_or(Device::Cpu);
        if params.iter().any(|p| p.device() != device) {
            bail!(Shape, "AdamW: every parameter must be on one device");
        }
        let slots = params
            .iter()
            .map(|p| {
                Ok(Slot {
                    shape: p.shape().to_vec(),
                    master: f32_store(p)?,
                    m: zeros_like(p)?,
                    v: zeros_like(p)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            device,
            slots,
        })
    }

    /// sqrt(Σ‖g‖²) over all gradients (f32 tensors on the optimiser's device).
    pub fn grad_norm(&self, grads: &[Tensor]) -> Result<f64> {
        self.check_grads(grads)?;
        match self.device {
            Device::Cpu => cpu::grad_norm(grads),
            Device::Cuda(_) => cuda::grad_norm(grads),
        }
    }

    /// One AdamW update of every master with `grads × clip` at learning rate `lr`.
    pub fn update(&mut self, grads: &[Tensor], lr: f64, clip: f32) -> Result<()> {
        self.check_grads(grads)?;
        self.step += 1;
        let c = self.cfg;
        let k = cpu::Coefficients::new(c, self.step, lr);
        match self.device {
            Device::Cpu => {
                for (s, g) in self.slots.iter_mut().zip(grads) {
                    let (Store::Cpu(p), Store::Cpu(m), Store::Cpu(v)) =
                        (&mut s.master, &mut s.m, &mut s.v)
                    else {
                        bail!(Shape, "AdamW: CPU state expected");
                    };
                    cpu::update(p, m, v, g.as_f32_slice()?, &k, clip);
                }
                Ok(())
            }
            Device::Cuda(_) => {
                let mut ptrs = Vec::with_capacity(self.slots.len());
                for (s, g) in self.slots.iter().zip(grads) {
                    let (Store::Cuda(p), Store::Cuda(m), Store::Cuda(v)) = (&s.master, &s.m, &s.v)
                    else {
                        bail!(Shape, "AdamW: GPU state expected");
                    };
                    let n = s.shape.iter().product::<usize>() as u64;
                    ptrs.extend_from_slice(&[
                        p.raw_ptr(),
                        g.cuda_storage()?.buf.raw_ptr(),
                        m.raw_ptr(),
                        v.raw_ptr(),
                        n,
                    ]);
                }
                cuda::adamw(self.device, &ptrs, self.slots.len(), &k, clip)
            }
        }
    }

    fn check_grads(&self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!(
                Shape,
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            );
        }
        for (s, g) in self.slots.iter().zip(grads) {
            if g.shape() != s.shape.as_slice()
                || g.dtype() != DType::F32
                || g.device() != self.device
            {
                bail!(
                    Shape,
                    "AdamW: gradient {:?} {} on {} for a parameter {:?}",
                    g.shape(),
                    g.dtype().name(),
                    g.device(),
                    s.shape
                );
            }
        }
        Ok(())
    }

    /// The masters as f32 tensors on the optimiser's device (copies).
    pub fn params(&self) -> Result<Vec<Tensor>> {
        self.slots
            .iter()
            .map(|s| match &s.master {
                Store::Cpu(v) => Tensor::from_f32(v.clone(), &s.shape),
                Store::Cuda(b) => Tensor::from_cuda(b.duplicate()?, DType::F32, &s.shape),
            })
            .collect()
    }

    /// (masters, m, v) on the host, for checkpoints.
    pub fn export(&self) -> Result<Vec<[Vec<f32>; 3]>> {
        let host = |s: &Store| -> Result<Vec<f32>> {
            Ok(match s {
                Store::Cpu(v) => v.clone(),
                Store::Cuda(b) => bytemuck::cast_slice(&b.download()?).to_vec(),
            })
        };
        self.slots
            .iter()
            .map(|s| Ok([host(&s.master)?, host(&s.m)?, host(&s.v)?]))
            .collect()
    }

    /// Restore (masters, m, v) and the step count from a checkpoint.
    pub fn import(&mut self, state: Vec<[Vec<f32>; 3]>, step: u64) -> Result<()> {
        if state.len() != self.slots.len() {
            bail!(
                Shape,
                "AdamW: checkpoint has {} tensors, the model {}",
                state.len(),
                self.slots.len()
            );
        }
        for (s, [p, m, v]) in self.slots.iter_mut().zip(state) {
            let n: usize = s.shape.iter().product();
            if p.len() != n || m.len() != n || v.len() != n {
                bail!(
                    Shape,
                    "AdamW: checkpoint tensor of {} values for a parameter of {n}",
                    p.len()
                );
            }
            let store = |data: Vec<f32>| -> Result<Store> {
                Ok(match self.device {
                    Device::Cpu => Store::Cpu(data),
                    Device::Cuda(i) => {
                        Store::Cuda(crate::cuda::device(i)?.upload(bytemuck::cast_slice(&data))?)
                    }
                })
            };
            s.master = store(p)?;
            s.m = store(m)?;
            s.v = store(v)?;
        }
        self.step = step;
        Ok(())
    }
}
