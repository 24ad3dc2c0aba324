//! TEMPORARY interface stand-in (replaced by the `index` branch at merge).
#![allow(missing_docs, unused_variables)]
use serde::{Deserialize, Serialize};
use crate::Result;
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct IndexConfig { pub m: usize, pub ef_construction: usize, pub ef_search: usize, pub storage: VectorStorage, pub rerank: usize, pub exact_below: usize, pub build_threads: usize, pub seed: u64 }
impl IndexConfig { pub fn validate(&self) -> Result<()> { Ok(()) } }
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum VectorStorage { #[default] F32, Int8 }
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SearchStrategy { #[default] Auto, Exact, Graph }
pub struct SearchParams<'a> { pub k: usize, pub ef: Option<usize>, pub strategy: SearchStrategy, pub filter: Option<&'a (dyn Fn(u32) -> bool + Sync)> }
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit { pub slot: u32, pub score: f32 }
pub struct VectorIndex {}
impl VectorIndex {
  pub fn new(dim: usize, cfg: IndexConfig) -> Result<Self> { unimplemented!() }
  pub fn dim(&self) -> usize { unimplemented!() }
  pub fn len(&self) -> usize { unimplemented!() }
  pub fn is_empty(&self) -> bool { unimplemented!() }
  pub fn slots(&self) -> usize { unimplemented!() }
  pub fn add(&mut self, v: &[f32]) -> Result<u32> { unimplemented!() }
  pub fn add_batch(&mut self, vs: &[f32]) -> Result<std::ops::Range<u32>> { unimplemented!() }
  pub fn remove(&mut self, slot: u32) -> Result<bool> { unimplemented!() }
  pub fn is_live(&self, slot: u32) -> bool { unimplemented!() }
  pub fn vector(&self, slot: u32) -> Option<&[f32]> { unimplemented!() }
  pub fn search(&self, q: &[f32], p: &SearchParams) -> Result<Vec<Hit>> { unimplemented!() }
  pub fn search_batch(&self, qs: &[f32], p: &SearchParams) -> Result<Vec<Vec<Hit>>> { unimplemented!() }
  pub fn deleted_fraction(&self) -> f32 { unimplemented!() }
  pub fn compact(&mut self) -> Vec<Option<u32>> { unimplemented!() }
  pub fn write_to(&self, w: &mut dyn std::io::Write) -> Result<()> { unimplemented!() }
  pub fn read_from(r: &mut dyn std::io::Read) -> Result<Self> { unimplemented!() }
  pub fn memory_bytes(&self) -> usize { unimplemented!() }
}
