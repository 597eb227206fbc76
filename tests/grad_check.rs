//! Finite-difference checks of every hand-written backward: for an op y = f(inputs) and a fixed
//! random weighting c, L = Σ c ⊙ y; the directional derivative (L(x + εv) − L(x − εv)) / 2ε
//! along a random direction v must equal ⟨∇L, v⟩ from the backward pass. Values are f32, so
//! with ε = 1e-2 the central difference carries ~1e-4 relative rounding noise; 2e-3 is the
//! tolerance.

mod common;

use engine::autograd::{Graph, ParamGrads, Var};
use engine::ops::SeqLayout;
use engine::ops::activation::Gate;
use engine::ops::attention::AttentionParams;
use engine::ops::linear::{BaseWeight, Linear, Lora};
use engine::ops::loss::cross_entropy;
use engine::ops::norm::{NormKind, RmsNorm};
use engine::ops::rope::{RopeTable, default_inv_freq};
use engine::tensor::Tensor;

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_f32(data, shape).unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Builds the op under test on a graph from its input values.
type OpUnderTest<'f> = dyn for<'a> Fn(&mut Graph<'a>, &[Var], &[Tensor]) -> Var + 'f;

/// Check d/dε of Σ c ⊙ f(inputs + ε·dirs) against the backward pass. `f` builds the op on a
/// graph from leaf inputs; `params` are trainable tensors among `inputs` (their gradients come
/// from ParamGrads rather than from leaves).
fn check(name: &str, inputs: Vec<Tensor>, param_idx: &[usize], f: &OpUnderTest<'_>) {
    let out = {
        let mut g = Graph::inference();
        let vars: Vec<Var> = inputs.iter().map(|x| g.constant(x.clone())).collect();
        f(&mut g, &vars, &inputs).into_tensor()
    };
    let c = common::rand_vec(out.elem_count(), 99, 1.0);
    let dirs: Vec<Vec<f32>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| common::rand_vec(x.elem_count(), 1000 + i as u64, 1.0))
        .collect();
    // Analytic.
    let params: Vec<&Tensor> = param_idx.iter().map(|&i| &inputs[i]).collect();
    let mut g = Graph::training(&params, false, 0.0, 1);
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if param_idx.contains(&i) {
                g.constant(x.clone())
            } else {
                g.leaf(x.clone())
            }
        })
        .collect();
    let y = f(&mut g, &vars, &inputs);
    let mut pg = ParamGrads::new(params.len());
    let wrt: Vec<&Var> = vars.iter().collect();
    let leaf_grads = g
        .backward(&y, t(c.clone(), y.tensor().shape()), &mut pg, &wrt)
        .unwrap();
    let param_grads = pg.into_grads();
    let mut analytic = 0f64;
    for (i, d) in dirs.iter().enumerate() {
        let grad = match param_idx.iter().position(|&p| p == i) {
            Some(pi) => param_grads[pi].clone(),
            None => leaf_grads[i].clone(),
        };
        if let Some(grad) = grad {
            analytic += dot(&grad.to_f32_vec().unwrap(), d);
        }
    }
    // Numerical.
    let eps = 1e-2f32;
    let eval = |sign: f32| -> f64 {
        let shifted: Vec<Tensor> = inputs
            .iter()
            .zip(&dirs)
            .map(|(x, d)| {
                t(
                    x.to_f32_vec()
                        .unwrap()
                        .iter()
                        .zip(d)
                        .map(|(a, b)| a + sign * eps * b)
                        .collect(),
                    x.shape(),
                )
            })
            .collect();
        let mut g = Graph::inference();
        let vars: Vec<Var> = shifted.iter().map(|x| g.constant(x.clone())).collect();
        dot(
            &f(&mut g, &vars, &shifted)
                .into_tensor()
                .to_f32_vec()
                .unwrap(),
            &c,
        )
    };
    let numeric = (eval(1.0) - eval(-1.0)) / (2.0 * eps as f64);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-3);
    println!("{name}: analytic {analytic:.6}, numeric {numeric:.6}, rel {rel:.1e}");
    assert!(
        rel < 2e-3,
        "{name}: analytic {analytic} vs numeric {numeric} (rel {rel:e})"
    );
}

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::rand_vec(n, seed, scale)
}

#[test]
fn linear_with_lora_and_trainable_weight() {
    let (tk, k, n, r) = (5usize, 12usize, 7usize, 3usize);
    let inputs = vec![
        t(rnd(tk * k, 1, 1.0), &[tk, k]),
        t(rnd(r * k, 2, 0.5), &[r, k]),
        t(rnd(n * r, 3, 0.5), &[n, r]),
    ];
    let w = t(rnd(n * k, 4, 0.5), &[n, k]);
    // LoRA A, B are parameters; the base weight is frozen (not perturbed).
    check("linear+lora", inputs.clone(), &[1, 2], &|g, v, raw| {
        let layer = Box::leak(Box::new(
            Linear::new(
                BaseWeight::Dense(w.clone()),
                Some(Lora {
                    a: raw[1].clone(),
                    b: raw[2].clone(),
                    scale: 1.7,
                }),
            )
            .unwrap(),
        ));
        g.linear(&v[0], layer).unwrap()
    });
    // A trainable dense weight (the score head) gets dW.
    check(
        "linear trainable weight",
        vec![inputs[0].clone(), w.clone()],
        &[1],
        &|g, v, raw| {
            let layer = Box::leak(Box::new(
                Linear::new(BaseWeight::Dense(raw[1].clone()), None).unwrap(),
            ));
            g.linear(&v[0], layer).unwrap()
        },
    );
}

#[test]
fn rms_norm_both_gains() {
    for kind in [NormKind::OnePlusWeight, NormKind::Weight] {
        let inputs = vec![t(rnd(4 * 9, 5, 2.0), &[4, 9])];
        let w = t(rnd(9, 6, 0.5), &[9]);
        check(&format!("rms_norm {kind:?}"), inputs, &[], &|g, v, _| {
            let norm = Box::leak(Box::new(RmsNorm {
                weight: w.clone(),
                eps: 1e-6,
                kind,
            }));
            g.rms_norm(&v[0], norm).unwrap()
        });
    }
}

#[test]
fn rope_attention_and_gathers() {
    let layout = SeqLayout::from_lens(&[5, 1, 9]);
    let (tk, nh, nkv, d) = (15usize, 4usize, 2usize, 6usize);
    let table = RopeTable::new(
        &layout.positions(),
        &default_inv_freq(d, 10000.0),
        engine::tensor::Device::Cpu,
    )
    .unwrap();
    check(
        "rope",
        vec![t(rnd(tk * nh * d, 7, 1.0), &[tk, nh * d])],
        &[],
        &|g, v, _| g.rope(&v[0], &table, d).unwrap(),
    );
    for (softcap, window) in [
        (None, None),
        (Some(0.7f32), Some(3usize)),
        (Some(5.0), None),
    ] {
        let p = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            scale: 0.6,
            softcap,
            window,
        };
        let inputs = vec![
            t(rnd(tk * nh * d, 8, 1.0), &[tk, nh * d]),
            t(rnd(tk * nkv * d, 9, 1.0), &[tk, nkv * d]),
            t(rnd(tk * nkv * d, 10, 1.0), &[tk, nkv * d]),
        ];
        let layout = layout.clone();
        check(
            &format!("attention softcap {softcap:?} window {window:?}"),
            inputs,
            &[],
            &move |g, v, _| g.attention(&v[0], &v[1], &v[2], &layout, &p).unwrap(),
        );
    }
    check(
        "gather_rows",
        vec![t(rnd(6 * 4, 11, 1.0), &[6, 4])],
        &[],
        &|g, v, _| g.gather_rows(&v[0], &[5, 0, 5]).unwrap(),
    );
    check(
        "add",
        vec![t(rnd(12, 12, 1.0), &[3, 4]), t(rnd(12, 13, 1.0), &[3, 4])],
        &[],
        &|g, v, _| g.add(&v[0], &v[1]).unwrap(),
    );
}

#[test]
fn gated_activations() {
    for act in [Gate::GeluTanh, Gate::Silu] {
        let inputs = vec![t(rnd(30, 14, 3.0), &[5, 6]), t(rnd(30, 15, 1.0), &[5, 6])];
        check(&format!("{act:?}"), inputs, &[], &|g, v, _| {
            g.gated(&v[0], &v[1], act).unwrap()
        });
    }
}

#[test]
fn cross_entropy_with_soft_targets_and_smoothing() {
    let logits = rnd(12, 16, 3.0);
    let targets = [
        [1.0, 0.0, 0.0],
        [0.2, 0.5, 0.3],
        [0.0, 0.0, 1.0],
        [0.6, 0.4, 0.0],
    ];
    for ls in [0.0, 0.1] {
        let (_, grad) = cross_entropy(&t(logits.clone(), &[4, 3]), &targets, ls).unwrap();
        let grad = grad.to_f32_vec().unwrap();
        for i in 0..12 {
            let mut a = logits.clone();
            let mut b = logits.clone();
            a[i] += 1e-2;
            b[i] -= 1e-2;
            // The step actually taken in f32 (the loss itself is computed in f64).
            let step = a[i] as f64 - b[i] as f64;
            let la = cross_entropy(&t(a, &[4, 3]), &targets, ls).unwrap().0;
            let lb = cross_entropy(&t(b, &[4, 3]), &targets, ls).unwrap().0;
            let num = (la - lb) / step;
            assert!(
                (num - grad[i] as f64).abs() < 1e-4,
                "dlogit {i} (ls {ls}): {} vs {num}",
                grad[i]
            );
        }
    }
}
