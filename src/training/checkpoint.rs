//! Training checkpoints shared by the trained methods (DRAEM, SuperSimpleNet):
//! `<model>/checkpoint/` holds the weights, the optimiser state and a JSON state of the
//! method's own shape, written so that a crash at any moment leaves one complete checkpoint.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::nn;

use super::adam::Adam;
use crate::error::{Error, Result};
use crate::model_file::CHECKPOINT_DIR;

const STATE_FILE: &str = "state.json";
const OPTIMISER_FILE: &str = "adam.safetensors";

/// The checkpoint folder to resume from: `checkpoint/`, or `checkpoint.old/` when a crash came
/// between the two renames of [`save`].
fn checkpoint_dir(out: &Path) -> Result<PathBuf> {
    let dir = out.join(CHECKPOINT_DIR);
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir);
    }
    let old = out.join(format!("{CHECKPOINT_DIR}.old"));
    if old.join(STATE_FILE).is_file() {
        return Ok(old);
    }
    Err(Error::model(out, "no training checkpoint to resume from (checkpoint/state.json); train without --resume first"))
}

/// The JSON state of the checkpoint in the model directory `out`.
pub(crate) fn read_state<T: DeserializeOwned>(out: &Path) -> Result<T> {
    let path = checkpoint_dir(out)?.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model(&path, format!("invalid checkpoint state: {e}")))
}

/// Loads the checkpoint's weights (`weights_file`) into `vars` and its optimiser state into
/// `adam`, checking that the optimiser took `steps` steps, as the JSON state says.
pub(crate) fn restore(out: &Path, weights_file: &str, vars: &mut nn::VarStore, adam: &mut Adam, steps: usize) -> Result<()> {
    let dir = checkpoint_dir(out)?;
    let weights = dir.join(weights_file);
    vars.load(&weights).map_err(|e| Error::model(&weights, format!("cannot load checkpoint weights: {e}")))?;
    adam.load(&dir.join(OPTIMISER_FILE))?;
    if adam.steps_taken() != steps as i64 {
        return Err(Error::model(&dir, "checkpoint weights and state disagree on the step count"));
    }
    Ok(())
}

/// Writes a checkpoint into `<out>/checkpoint/` via a temporary folder, so that a crash
/// leaves the previous checkpoint usable.
pub(crate) fn save(out: &Path, weights_file: &str, vars: &nn::VarStore, adam: &Adam, state: &impl Serialize) -> Result<()> {
    let dir = out.join(CHECKPOINT_DIR);
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let old = out.join(format!("{CHECKPOINT_DIR}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights = tmp.join(weights_file);
    vars.save(&weights).map_err(|e| Error::model(&weights, format!("cannot write checkpoint: {e}")))?;
    adam.save(&tmp.join(OPTIMISER_FILE))?;
    let json = serde_json::to_string(state).map_err(|e| Error::Config(format!("cannot write the checkpoint state: {e}")))?;
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
