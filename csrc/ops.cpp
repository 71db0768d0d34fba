// The one place where specops' op schemas are written (contract: ../specops-contract.md).
// Each backend only adds kernels: csrc/*_cpu.cpp for the CPU (TORCH_LIBRARY_IMPL),
// specops/triton_kernels/ for CUDA, specops/_fake.py for meta tensors.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "checks.h"
#include "philox.h"

namespace specops {

namespace {
std::atomic<int> g_check_level{static_cast<int>(CheckLevel::kCheap)};
}

CheckLevel check_level() { return static_cast<CheckLevel>(g_check_level.load()); }
void set_check_level(CheckLevel level) { g_check_level.store(static_cast<int>(level)); }

}  // namespace specops

TORCH_LIBRARY(specops, m) {
  m.def("sampling_probs(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p) -> Tensor");
  m.def(
      "chain_verify(Tensor target_probs, Tensor draft_tokens, Tensor? draft_probs, "
      "Tensor draft_lens, Tensor seeds, Tensor positions) -> (Tensor, Tensor)");
  m.def(
      "chain_verify_greedy(Tensor target_logits, Tensor draft_tokens, Tensor draft_lens) "
      "-> (Tensor, Tensor)");
  m.def("tree_metadata(Tensor parents, Tensor num_nodes) -> (Tensor, Tensor)");
  m.def(
      "tree_verify(Tensor target_probs, Tensor tree_tokens, Tensor parents, Tensor num_nodes, "
      "Tensor? draft_probs, Tensor seeds, Tensor positions) -> (Tensor, Tensor, Tensor)");
  m.def(
      "tree_verify_greedy(Tensor target_logits, Tensor tree_tokens, Tensor parents, "
      "Tensor num_nodes) -> (Tensor, Tensor, Tensor)");
  // Moves the accepted path's cache entries behind the root in place, in every tensor of kv.
  m.def(
      "kv_commit(Tensor(a!)[] kv, Tensor cache_lens, Tensor path, Tensor num_accepted, "
      "Tensor? block_tables) -> Tensor");
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor mask, "
      "float? scale, Tensor? block_tables) -> Tensor");
  // y = x @ weight^T (+ bias) for a few rows of x, reading weight once (torch's F.linear).
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "specops C++ extension: op schemas and CPU kernels";
  m.attr("torch_version") = SPECOPS_TORCH_VERSION;
  m.def("set_check_level", [](int level) {
    if (level < 0 || level > 2) throw pybind11::value_error("check level must be 0, 1 or 2");
    specops::set_check_level(static_cast<specops::CheckLevel>(level));
  });
  m.def("check_level", [] { return static_cast<int>(specops::check_level()); });
  // How many threads one at::parallel_for over many small tasks runs on: the kernels'
  // parallel loops are compiled into this module, so a build without OpenMP would run them
  // on one thread whatever torch.set_num_threads says. Exposed for tests.
  m.def("parallel_threads", [] {
    std::atomic<uint64_t> seen{0};
    at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
      seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64));
    });
    return __builtin_popcountll(seen.load());
  });
  m.def("philox_uniform", &specops::philox_uniform,
        "u in [0, 1) for (seed, position, sibling_rank, purpose); exposed for tests");
}
