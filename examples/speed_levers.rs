//! Speed levers of the PatchCore engine on this CPU, each against the plain form in one run
//! (issue 18, point 2): the backbone with BatchNorm explicit / folded / folded + channels-last /
//! that in bfloat16 (largest difference of the stage outputs from the explicit form), the map's upsampling and
//! blur, the preprocessing steps, a plain matmul (the cores' floor), and the kNN's distance
//! matmul in float32 and bfloat16; with a model and images, bfloat16 candidates re-ranked in
//! float32 against the exact search on real patches.
//!
//!   cargo run --release --features studies --example speed_levers -- [HxW ...]
//!   SPEED_LEVERS_MODEL=<PatchCore model> SPEED_LEVERS_IMAGES=<folder> cargo run ... (as above)
//!
//! Medians of 30 runs after 5. Measured on 2 cores (2026-12-06): backbone stages 1-5 at 256x256
//! 16.1 ms explicit, 9.6 folded + channels-last, 7.0 in bfloat16 (AMX); 1024x417 -> 384x160
//! resize 1.48 ms on floats, 0.47 on bytes; blur 1.35 ms; bfloat16 top-4 candidates
//! re-ranked found the exact nearest row for all 51 328 patches of 60 defect images (screws,
//! Magnetic-Tile) but took as long as the exact search at 3 300 rows (topk eats the saving).
use std::time::Instant;

use anomaly_inspector::models::backbone::EfficientNetLite0;
use tch::{Device, Kind, Tensor};

/// Median ms of 30 calls of `f` after 5 warm-up calls; the first error stops it.
fn median_ms(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    let mut v = Vec::with_capacity(30);
    for _ in 0..30 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    let weights = anomaly_inspector::config::default_backbone_weights();
    let plain = EfficientNetLite0::load(&weights, Device::Cpu)?;
    let mut folded = EfficientNetLite0::load(&weights, Device::Cpu)?;
    folded.fold_batch_norm()?;
    let mut folded_cl = EfficientNetLite0::load(&weights, Device::Cpu)?;
    folded_cl.fold_batch_norm()?;
    folded_cl.use_channels_last()?;
    let mut cl = EfficientNetLite0::load(&weights, Device::Cpu)?;
    cl.use_channels_last()?;
    let mut bf16 = EfficientNetLite0::load(&weights, Device::Cpu)?.into_inference_form()?;
    bf16.use_bfloat16()?;
    let sizes: Vec<String> = std::env::args().skip(1).collect();
    let sizes = if sizes.is_empty() { vec!["256x256".to_string(), "160x384".into()] } else { sizes };
    for size in sizes {
        let (h, w) = size.split_once('x').ok_or_else(|| anyhow::anyhow!("size HxW"))?;
        let x = Tensor::randn([1, 3, h.parse()?, w.parse()?], (Kind::Float, Device::Cpu));
        let reference = plain.forward_stages(&x, 5)?;
        for (name, net) in [
            ("explicit", &plain),
            ("channels-last", &cl),
            ("folded", &folded),
            ("folded+cl", &folded_cl),
            ("folded+cl bf16", &bf16),
        ] {
            let out = net.forward_stages(&x, 5)?;
            let diff = [2usize, 4].iter().map(|&i| (&out[i] - &reference[i]).abs().max().double_value(&[])).fold(0.0, f64::max);
            let ms = median_ms(|| {
                drop(net.forward_stages(&x, 5)?);
                Ok(())
            })?;
            println!("{size} backbone {name:<14} {ms:7.2} ms   max |diff| {diff:.2e}");
        }
    }
    // The map: patch grid -> input size, Gaussian sigma 4 (PatchCore's default).
    for (fh, fw) in [(32i64, 32i64), (20, 48)] {
        let grid = Tensor::rand([1, 1, fh, fw], (Kind::Float, Device::Cpu));
        let up = || grid.upsample_bilinear2d([fh * 8, fw * 8], false, None, None);
        let up_ms = median_ms(|| {
            drop(up());
            Ok(())
        })?;
        let maps = up();
        let blur_ms = median_ms(|| {
            drop(anomaly_inspector::models::patchcore::gaussian_blur(&maps, 4.0)?);
            Ok(())
        })?;
        println!("map {}x{}: upsample {up_ms:.2} ms, blur sigma 4 {blur_ms:.2} ms", fh * 8, fw * 8);
    }
    // Preprocessing of a 1024x417 RGB frame to 160x384 (keep-aspect input of the pitting set).
    let (fh, fw) = (417i64, 1024i64);
    let hwc = Tensor::randint(255, [fh, fw, 3], (Kind::Uint8, Device::Cpu));
    let chw = hwc.permute([2, 0, 1]).unsqueeze(0);
    let to_float = median_ms(|| {
        drop(chw.to_kind(Kind::Float));
        Ok(())
    })?;
    let xf = chw.to_kind(Kind::Float);
    let div = median_ms(|| {
        drop(xf.divide_scalar(255.0));
        Ok(())
    })?;
    let resize = median_ms(|| {
        drop(xf.internal_upsample_bilinear2d_aa([160, 384], false, None, None));
        Ok(())
    })?;
    let xc = xf.contiguous();
    let resize_nchw = median_ms(|| {
        drop(xc.internal_upsample_bilinear2d_aa([160, 384], false, None, None));
        Ok(())
    })?;
    let chw_planar = chw.contiguous();
    let resize_u8 = median_ms(|| {
        drop(chw_planar.internal_upsample_bilinear2d_aa([160, 384], false, None, None).to_kind(Kind::Float));
        Ok(())
    })?;
    let resize_u8_cl = median_ms(|| {
        drop(chw.internal_upsample_bilinear2d_aa([160, 384], false, None, None).to_kind(Kind::Float));
        Ok(())
    })?;
    let planar = median_ms(|| {
        drop(chw.contiguous());
        Ok(())
    })?;
    println!(
        "preprocess 1024x417 -> 384x160: to float {to_float:.2} ms, /255 {div:.2} ms, resize (channels-last) {resize:.2} ms, \
         resize (contiguous) {resize_nchw:.2} ms, u8 planar {planar:.2} ms, resize u8 + to float {resize_u8:.2} ms \
         (channels-last {resize_u8_cl:.2} ms)"
    );
    // bfloat16 candidates + float32 re-ranking against the exact search, on real patches:
    // SPEED_LEVERS_MODEL=<PatchCore model dir> SPEED_LEVERS_IMAGES=<dir of test images>.
    if let (Ok(model), Ok(images)) = (std::env::var("SPEED_LEVERS_MODEL"), std::env::var("SPEED_LEVERS_IMAGES")) {
        bf16_search_study(std::path::Path::new(&model), std::path::Path::new(&images))?;
    }
    // What these cores do in a plain matmul: the physical floor's unit.
    for kind in [Kind::Float, Kind::BFloat16] {
        let a = Tensor::randn([1024, 1024], (kind, Device::Cpu));
        let ms = median_ms(|| {
            drop(a.matmul(&a));
            Ok(())
        })?;
        println!("plain matmul 1024^3 {kind:?}: {ms:.2} ms = {:.0} GFLOP/s", 2.0 * 1024f64.powi(3) / ms / 1e6);
    }
    for rows in [3300i64, 40_000] {
        let q = Tensor::randn([1024, 152], (Kind::Float, Device::Cpu));
        let bank = Tensor::randn([rows, 152], (Kind::Float, Device::Cpu));
        let (qb, bb) = (q.to_kind(Kind::BFloat16), bank.to_kind(Kind::BFloat16));
        let f32_ms = median_ms(|| {
            drop(q.matmul(&bank.tr()).min_dim(1, false));
            Ok(())
        })?;
        let bf16_ms = median_ms(|| {
            drop(qb.matmul(&bb.tr()).min_dim(1, false));
            Ok(())
        })?;
        println!("kNN matmul+min 1024 x {rows}: float32 {f32_ms:.2} ms, bfloat16 {bf16_ms:.2} ms");
    }
    Ok(())
}

/// Nearest bank row of `q` `[Q, D]`: the `k` best of a bfloat16 search in centred coordinates,
/// re-ranked with float32 distances: (`[Q]` distances, `[Q]` indices).
fn bf16_nearest(bank: &Tensor, mean: &Tensor, bank16: &Tensor, sq16: &Tensor, q: &Tensor, k: i64) -> (Tensor, Tensor) {
    let qc = q - mean;
    let partial = sq16.unsqueeze(0).addmm(&(&qc * -2.0).to_kind(Kind::BFloat16), &bank16.tr());
    let (_, cand) = partial.topk(k, 1, false, false);
    let (nq, d) = (q.size()[0], q.size()[1]);
    let rows = bank.index_select(0, &cand.view([-1])).view([nq, k, d]);
    let d2 = (rows - q.unsqueeze(1)).square().sum_dim_intlist(2, false, Kind::Float);
    let (best, pos) = d2.min_dim(1, false);
    (best.sqrt(), cand.gather(1, &pos.unsqueeze(1), false).view([-1]))
}

fn bf16_search_study(model: &std::path::Path, images: &std::path::Path) -> anyhow::Result<()> {
    use anomaly_inspector::models::patchcore::{embed, flatten_patches};
    let inspector = anomaly_inspector::Inspector::new(model, Device::Cpu, &Default::default())?;
    let (m, pre) = inspector.parts();
    let anomaly_inspector::model_file::AnomalyModel::PatchCore(pc) = m else { anyhow::bail!("not a PatchCore model") };
    let bank = pc.memory_bank();
    let feats = bank.features();
    let mean = feats.mean_dim(0, true, Kind::Float);
    let centred = feats - &mean;
    let bank16 = centred.to_kind(Kind::BFloat16);
    let sq16 = centred.square().sum_dim_intlist(1, false, Kind::Float).to_kind(Kind::BFloat16);
    let mut paths: Vec<_> = std::fs::read_dir(images)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for k in [4i64, 8, 16] {
        let (mut n, mut differ, mut worst, mut t_exact, mut t_bf16) = (0i64, 0i64, 0f64, 0f64, 0f64);
        for path in paths.iter().take(30) {
            let image = anomaly_inspector::imaging::load(path)?;
            let x = pre.inputs(&image)?.0;
            let q = flatten_patches(&embed(pc.backbone(), &x, pc.config().neighbourhood)?)?;
            let t = Instant::now();
            let (d, i) = bank.nearest(&q, 1)?;
            t_exact += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let (d16, i16) = bf16_nearest(feats, &mean, &bank16, &sq16, &q, k);
            t_bf16 += t.elapsed().as_secs_f64();
            let d = d.view([-1]);
            n += q.size()[0];
            differ += i.view([-1]).ne_tensor(&i16).sum(Kind::Int64).int64_value(&[]);
            let rel = ((&d16 - &d).abs() / d.clamp_min(1e-6)).max().double_value(&[]);
            worst = worst.max(rel);
        }
        println!(
            "{}: bf16 top-{k} + float32 re-rank vs exact over {n} patches: {differ} other rows, worst relative distance error {worst:.2e}; \
             exact {:.1} ms, bf16 {:.1} ms per image",
            model.display(),
            t_exact * 1e3 / 30.0,
            t_bf16 * 1e3 / 30.0
        );
    }
    Ok(())
}
