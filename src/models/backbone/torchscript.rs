//! Any TorchScript feature extractor, e.g. a torchvision `wide_resnet50_2` cut after
//! `layer3` and exported with `torch.jit.trace` / `torch.jit.script` by a user who has the
//! weights (none can be downloaded here).
//!
//! The module's `forward(x)` takes one `[N, 3, H, W]` float tensor and returns either a tensor,
//! a tuple or list of tensors, or a dict of `str -> Tensor`; outputs are numbered `0, 1, ...`
//! in that order (for a dict: insertion order).
use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Tensor};

use crate::error::{Error, Result};

/// A TorchScript module used as a feature extractor (eval mode, run without gradients).
#[derive(Debug)]
pub struct TorchScriptBackbone {
    module: CModule,
    path: PathBuf,
}

impl TorchScriptBackbone {
    /// Loads the module at `path` onto `device` and puts it in eval mode.
    pub fn new(path: &Path, device: Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, "TorchScript backbone not found (export one with torch.jit.trace and save it)"));
        }
        let mut module = CModule::load_on_device(path, device)
            .map_err(|e| Error::model(path, format!("not a loadable TorchScript module: {e}")))?;
        module.f_set_eval().map_err(|e| Error::model(path, format!("cannot switch the module to eval mode: {e}")))?;
        Ok(Self { module, path: path.to_path_buf() })
    }

    /// The file the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `forward(x)` on `x` `[N, 3, H, W]` and returns every output tensor in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let out = tch::no_grad(|| self.module.forward_is(&[IValue::Tensor(x.shallow_clone())]))?;
        outputs_to_tensors(out, &self.path)
    }
}

fn kind_name(v: &IValue) -> &'static str {
    match v {
        IValue::Tensor(_) => "Tensor",
        IValue::Tuple(_) => "tuple",
        IValue::TensorList(_) => "List[Tensor]",
        IValue::GenericList(_) => "list",
        IValue::GenericDict(_) => "dict",
        IValue::None => "None",
        IValue::Int(_) => "int",
        IValue::Double(_) => "float",
        IValue::Bool(_) => "bool",
        IValue::String(_) => "str",
        IValue::IntList(_) | IValue::DoubleList(_) | IValue::BoolList(_) | IValue::StringList(_) => "list of scalars",
        IValue::Object(_) => "script object",
        IValue::Device(_) => "device",
        _ => "value of an unsupported type",
    }
}

/// Flattens what `forward` returned into tensors: a Tensor, a tuple/list of Tensors, or a
/// dict of str -> Tensor (values in insertion order). Anything else is an [`Error::Model`].
pub(crate) fn outputs_to_tensors(out: IValue, path: &Path) -> Result<Vec<Tensor>> {
    let expected = "expected forward(x) to return a Tensor, a tuple/list of Tensors or a dict of str -> Tensor";
    let elements = |items: Vec<IValue>, what: &str| -> Result<Vec<Tensor>> {
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                IValue::Tensor(t) => Ok(t),
                other => Err(Error::model(path, format!("{what} element {i} is a {}; {expected}", kind_name(&other)))),
            })
            .collect()
    };
    let tensors = match out {
        IValue::Tensor(t) => vec![t],
        IValue::TensorList(ts) => ts,
        IValue::Tuple(items) => elements(items, "tuple")?,
        IValue::GenericList(items) => elements(items, "list")?,
        IValue::GenericDict(entries) => entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (IValue::String(_), IValue::Tensor(t)) => Ok(t),
                (IValue::String(k), other) => {
                    Err(Error::model(path, format!("dict value '{k}' is a {}; {expected}", kind_name(&other))))
                }
                (k, _) => Err(Error::model(path, format!("dict key is a {}; {expected}", kind_name(&k)))),
            })
            .collect::<Result<_>>()?,
        other => return Err(Error::model(path, format!("forward returned a {}; {expected}", kind_name(&other)))),
    };
    if tensors.is_empty() {
        return Err(Error::model(path, format!("forward returned no tensor; {expected}")));
    }
    Ok(tensors)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::Kind;

    /// CRC-32 (IEEE), as zip wants it.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A zip archive of stored (uncompressed) entries.
    fn zip_stored(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        fn u16le(v: &mut Vec<u8>, x: u16) {
            v.extend_from_slice(&x.to_le_bytes());
        }
        fn u32le(v: &mut Vec<u8>, x: u32) {
            v.extend_from_slice(&x.to_le_bytes());
        }
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let offset = out.len() as u32;
            let (crc, len, name_len) = (crc32(data), data.len() as u32, name.len() as u16);
            // local file header
            u32le(&mut out, 0x0403_4b50);
            for x in [20u16, 0, 0, 0, 0x21] {
                u16le(&mut out, x); // version needed, flags, method (stored), time, date
            }
            for x in [crc, len, len] {
                u32le(&mut out, x);
            }
            u16le(&mut out, name_len);
            u16le(&mut out, 0); // extra length
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            // central directory entry
            u32le(&mut central, 0x0201_4b50);
            for x in [20u16, 20, 0, 0, 0, 0x21] {
                u16le(&mut central, x); // made by, needed, flags, method, time, date
            }
            for x in [crc, len, len] {
                u32le(&mut central, x);
            }
            for x in [name_len, 0, 0, 0, 0] {
                u16le(&mut central, x); // name, extra, comment lengths, disk, internal attributes
            }
            u32le(&mut central, 0); // external attributes
            u32le(&mut central, offset);
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        u32le(&mut out, 0x0605_4b50);
        for x in [0u16, 0, entries.len() as u16, entries.len() as u16] {
            u16le(&mut out, x);
        }
        u32le(&mut out, central.len() as u32);
        u32le(&mut out, cd_offset);
        u16le(&mut out, 0); // comment length
        out
    }

    /// Writes a parameter-free TorchScript module (class `__torch__.Extractor`) whose
    /// `forward(self, x: Tensor) -> {ret}` has the body `body` (TorchScript source, indented
    /// by 4 spaces). This stands in for `torch.jit.save`, which needs Python torch; tracing
    /// from Rust cannot export more than one output.
    pub(crate) fn write_script_module(path: &Path, ret: &str, body: &str) {
        let code = format!(
            "class Extractor(Module):\n  __parameters__ = []\n  __buffers__ = []\n  training : bool\n  \
             def forward(self: __torch__.Extractor,\n    x: Tensor) -> {ret}:\n{body}\n"
        );
        // Extractor() with {"training": True}: PROTO 2, GLOBAL, EMPTY_TUPLE, NEWOBJ, EMPTY_DICT,
        // MARK, BINUNICODE "training", NEWTRUE, SETITEMS, BUILD, STOP.
        let mut data = b"\x80\x02c__torch__\nExtractor\n)\x81}(X".to_vec();
        data.extend_from_slice(&8u32.to_le_bytes());
        data.extend_from_slice(b"training\x88ub.");
        let entries = vec![
            ("extractor/data.pkl".to_string(), data),
            ("extractor/code/__torch__.py".to_string(), code.into_bytes()),
            ("extractor/constants.pkl".to_string(), b"\x80\x02).".to_vec()),
            ("extractor/version".to_string(), b"3\n".to_vec()),
        ];
        std::fs::write(path, zip_stored(&entries)).unwrap();
    }

    fn t(v: f64) -> Tensor {
        Tensor::full([1, 2, 3, 3], v, (Kind::Float, Device::Cpu))
    }

    fn values(ts: &[Tensor]) -> Vec<f64> {
        ts.iter().map(|t| t.mean(Kind::Double).double_value(&[])).collect()
    }

    #[test]
    fn output_shapes_are_flattened_in_order() {
        let p = Path::new("m.pt");
        assert_eq!(values(&outputs_to_tensors(IValue::Tensor(t(1.0)), p).unwrap()), [1.0]);
        let tuple = IValue::Tuple(vec![IValue::Tensor(t(1.0)), IValue::Tensor(t(2.0))]);
        assert_eq!(values(&outputs_to_tensors(tuple, p).unwrap()), [1.0, 2.0]);
        let list = IValue::TensorList(vec![t(3.0), t(4.0)]);
        assert_eq!(values(&outputs_to_tensors(list, p).unwrap()), [3.0, 4.0]);
        let generic = IValue::GenericList(vec![IValue::Tensor(t(5.0))]);
        assert_eq!(values(&outputs_to_tensors(generic, p).unwrap()), [5.0]);
        let dict = IValue::GenericDict(vec![
            (IValue::String("layer3".into()), IValue::Tensor(t(7.0))),
            (IValue::String("layer2".into()), IValue::Tensor(t(6.0))),
        ]);
        assert_eq!(values(&outputs_to_tensors(dict, p).unwrap()), [7.0, 6.0]);
    }

    #[test]
    fn other_outputs_are_model_errors() {
        let p = Path::new("m.pt");
        for bad in [
            IValue::Int(3),
            IValue::None,
            IValue::Tuple(vec![IValue::Tensor(t(1.0)), IValue::Int(2)]),
            IValue::Tuple(vec![]),
            IValue::GenericDict(vec![(IValue::Int(0), IValue::Tensor(t(1.0)))]),
            IValue::GenericDict(vec![(IValue::String("a".into()), IValue::Double(1.0))]),
        ] {
            let err = outputs_to_tensors(bad, p).unwrap_err();
            assert!(matches!(err, Error::Model { .. }), "{err}");
        }
    }

    #[test]
    fn missing_and_corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pt");
        assert!(matches!(TorchScriptBackbone::new(&missing, Device::Cpu), Err(Error::Model { .. })));
        let corrupt = dir.path().join("corrupt.pt");
        std::fs::write(&corrupt, b"PK\x03\x04 definitely not a torchscript archive").unwrap();
        assert!(matches!(TorchScriptBackbone::new(&corrupt, Device::Cpu), Err(Error::Model { .. })));
    }

    #[test]
    fn traced_module_round_trip() {
        // Tracing from Rust exports exactly one output (libtorch refuses to save more).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("traced.pt");
        let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
        let mut f = |inputs: &[Tensor]| vec![inputs[0].avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)];
        let module = CModule::create_by_tracing("Backbone", "forward", &[x], &mut f).unwrap();
        module.save(&file).unwrap();
        let backbone = TorchScriptBackbone::new(&file, Device::Cpu).unwrap();
        let y = Tensor::randn([2, 3, 16, 12], (Kind::Float, Device::Cpu));
        let out = backbone.forward(&y).unwrap();
        assert_eq!(out.len(), 1);
        let expected = y.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
        assert!(out[0].allclose(&expected, 1e-6, 1e-6, false));
        // a wrong input rank is an error, not a panic
        assert!(backbone.forward(&Tensor::zeros([3], (Kind::Float, Device::Cpu))).is_err());
    }

    #[test]
    fn scripted_tuple_list_and_dict_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let y = Tensor::randn([2, 3, 16, 12], (Kind::Float, Device::Cpu));
        let p2 = y.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
        let body = "    _0 = torch.avg_pool2d(x, [2, 2], [2, 2], [0, 0])\n    _1 = torch.mul(x, 2.)\n";
        for (name, ret, result, expected) in [
            ("tuple", "Tuple[Tensor, Tensor]", "(_0, _1)", [0usize, 1]),
            ("list", "List[Tensor]", "[_1, _0]", [1, 0]),
            ("dict", "Dict[str, Tensor]", "{\"layer3\": _1, \"layer2\": _0}", [1, 0]),
        ] {
            let file = dir.path().join(format!("{name}.pt"));
            write_script_module(&file, ret, &format!("{body}    return {result}"));
            let backbone = TorchScriptBackbone::new(&file, Device::Cpu).unwrap();
            let out = backbone.forward(&y).unwrap();
            assert_eq!(out.len(), 2, "{name}");
            let want = [p2.shallow_clone(), &y * 2.0];
            for (o, &e) in out.iter().zip(&expected) {
                assert!(o.allclose(&want[e], 1e-6, 1e-6, false), "{name}");
            }
        }
        // an int output is a model error
        let file = dir.path().join("int.pt");
        write_script_module(&file, "int", "    return 3");
        let backbone = TorchScriptBackbone::new(&file, Device::Cpu).unwrap();
        assert!(matches!(backbone.forward(&y), Err(Error::Model { .. })));
    }
}
