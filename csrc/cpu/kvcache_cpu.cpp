// KV-cache decode attention on the CPU: a length per sequence, dense or paged caches.
//
//   out = cpp_attention_kvcache(q, k_cache, v_cache, seqlens_k, block_table, causal, scale)
//
// q (B, Tq, H, D); k_cache, v_cache dense (B, Tmax, Hkv, D), or paged (num_blocks, page_size,
// Hkv, D) with block_table (B, max_blocks) int32: key j of sequence b is row j % page_size of page
// block_table[b, j / page_size]. seqlens_k (B,) int32 counts each sequence's valid keys (new keys
// included); causal aligns bottom-right per sequence: query i sees keys j <= i + seqlens_k[b] - Tq.
// out (B, Tq, H, D) in q's dtype; a row that sees no key is 0.
//
// Work: the keys of each (sequence, kv head) are cut into chunks ("splits"); one task folds a
// chunk into an unnormalised partial (acc, m, l) for all G * Tq query rows of that kv head (the
// GQA group times the query positions), so each key and value row is read once per kv head. Tasks
// run in parallel, longest first, claimed one at a time; a second parallel pass merges the
// partials of each (sequence, kv head) by their maxima:
//     m = max_s m_s,   out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s.
// Inside a task keys go in runs of up to kRun rows that lie in one page (one row stride); 16-bit
// rows are widened to fp32 once per run. Scores are q . k per (row, key) and P V is one axpy per
// (key, row), both vectorised over D with at::vec. fp32 and fp64 accumulate natively, fp16 and
// bf16 in fp32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "row_ops.h"
#include "variants.h"

namespace fastgpt::cpu {
namespace {

constexpr int64_t kRun = 64;            // keys per run (scores of one run live in scratch)
constexpr int64_t kMinChunk = 256;      // keys per split, at least
constexpr int64_t kTasksPerThread = 4;  // splits aim at this many tasks per thread in all

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Problem {
  int64_t B, Tq, H, Hkv, D;
  int64_t page_size;  // rows per page; a dense cache is one page of Tmax rows per sequence
  int64_t blocks_per_seq;
  bool paged, causal;
  int64_t left = -1, right = -1;  // window (flash-attn's, -1: unbounded)
  double softcap = 0.0;           // > 0: scores become softcap * tanh(s / softcap)
  int64_t group() const { return H / Hkv; }
  // Keys [key_lo, key_hi) that query i of a sequence of seqlen keys sees (bottom-right).
  int64_t key_hi(int64_t seqlen, int64_t i) const {
    const int64_t d = seqlen - Tq + i;
    int64_t hi = causal ? d + 1 : seqlen;
    if (right >= 0) hi = std::min(hi, d + right + 1);
    return hi;
  }
  int64_t key_lo(int64_t seqlen, int64_t i) const {
    return left >= 0 ? std::max<int64_t>(seqlen - Tq + i - left, 0) : 0;
  }
  int64_t rows() const { return group() * Tq; }  // query rows per kv head: r = i * G + g
};

// A (b or page, t, h, D) cache with a unit last stride.
template <typename In>
struct Cache {
  const In* p;
  int64_t s0, s1, s2;
};

// One split: keys [lo, hi) of sequence b, kv head hk.
struct Task {
  int64_t b, hk, lo, hi;
};

// Scratch of one thread: q rows (scaled, compute type), scores, widened K and V runs.
template <typename T>
struct Scratch {
  std::vector<T> q, S, k, v;
  explicit Scratch(const Problem& s)
      : q(s.rows() * s.D), S(s.rows() * kRun), k(kRun * s.D), v(kRun * s.D) {}
};

// x[0:n] += a * y[0:n]
template <typename T>
inline void axpy(T* x, T a, const T* y, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V va(a);
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size())
    at::vec::fmadd(va, V::loadu(y + d), V::loadu(x + d)).store(x + d);
  for (; d < n; ++d) x[d] += a * y[d];
}

// dst[0:n] = src[0:n] widened to T (fp16 / bf16 -> fp32 through at::vec).
template <typename In, typename T>
inline void widen(const In* src, T* dst, int64_t n) {
  int64_t d = 0;
  if constexpr (std::is_same_v<In, at::Half> || std::is_same_v<In, at::BFloat16>) {
    using VI = at::vec::Vectorized<In>;
    using VF = at::vec::Vectorized<float>;
    for (; d + VI::size() <= n; d += VI::size()) {
      auto [lo, hi] = at::vec::convert_to_float<In>(VI::loadu(src + d));
      lo.store(dst + d);
      hi.store(dst + d + VF::size());
    }
  }
  for (; d < n; ++d) dst[d] = static_cast<T>(src[d]);
}

// Rows [j, j + n) of one page of a cache head as T: the cache itself when In is T, else a
// widened copy in buf. Returns the first row; *ld is the row stride.
template <typename In, typename T>
const T* run_rows(const In* first, int64_t stride, int64_t n, int64_t D, T* buf, int64_t* ld) {
  if constexpr (std::is_same_v<In, T>) {
    *ld = stride;
    return first;
  } else {
    for (int64_t r = 0; r < n; ++r) widen<In, T>(first + r * stride, buf + r * D, D);
    *ld = D;
    return buf;
  }
}

// Folds scores S (rows, n) of one run into the running (acc, m, l): each row r keeps its visible
// keys [a, b) (softcapped), S becomes p = e^(S - m_new) there and 0 elsewhere.
template <typename T>
void online_softmax(const Problem& s, int64_t seqlen, int64_t j0, int64_t n, T* S, T* acc, T* m,
                    T* l) {
  for (int64_t r = 0; r < s.rows(); ++r) {
    T* srow = S + r * kRun;
    const int64_t i = r / s.group();
    const int64_t a = std::clamp<int64_t>(s.key_lo(seqlen, i) - j0, 0, n);
    const int64_t b = std::max(a, std::clamp<int64_t>(s.key_hi(seqlen, i) - j0, 0, n));
    const int64_t nr = b - a;
    if (nr > 0) {
      if (s.softcap > 0.0) softcap_row(srow + a, nr, static_cast<T>(s.softcap));
      const T m_new = std::max(m[r], row_max(srow + a, nr));
      const T sum = exp_shift_sum(srow + a, nr, m_new);
      if (m_new != m[r]) {
        const T alpha = std::exp(m[r] - m_new);  // 0 on the row's first visible key
        l[r] *= alpha;
        scale_row(acc + r * s.D, s.D, alpha);
        m[r] = m_new;
      }
      l[r] += sum;
    }
    std::fill(srow, srow + a, T(0));
    std::fill(srow + b, srow + n, T(0));
  }
}

// One split: acc (rows, D), m, l (rows,) of its partial, from keys [t.lo, t.hi).
template <typename In, typename T>
void fold_split(const Problem& s, const Cache<In>& kc, const Cache<In>& vc, const int32_t* table,
                int64_t seqlen, const Task& t, Scratch<T>& w, T* acc, T* m, T* l) {
  const int64_t D = s.D, rows = s.rows();
  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(l, l + rows, T(0));
  std::fill(acc, acc + rows * D, T(0));
  for (int64_t j0 = t.lo; j0 < t.hi;) {
    const int64_t in_page = j0 % s.page_size;
    const int64_t n = std::min({kRun, t.hi - j0, s.page_size - in_page});
    const int64_t base = s.paged ? table[t.b * s.blocks_per_seq + j0 / s.page_size] : t.b;
    const In* k0 = kc.p + base * kc.s0 + in_page * kc.s1 + t.hk * kc.s2;
    const In* v0 = vc.p + base * vc.s0 + in_page * vc.s1 + t.hk * vc.s2;
    int64_t ldk = 0, ldv = 0;
    const T* k = run_rows<In, T>(k0, kc.s1, n, D, w.k.data(), &ldk);
    T* S = w.S.data();
    for (int64_t j = 0; j < n; ++j) {  // S (rows, n) = (scale q) k^T
      for (int64_t r = 0; r < rows; ++r)
        S[r * kRun + j] = dot_row(w.q.data() + r * D, k + j * ldk, D);
    }
    online_softmax<T>(s, seqlen, j0, n, S, acc, m, l);
    const T* v = run_rows<In, T>(v0, vc.s1, n, D, w.v.data(), &ldv);
    for (int64_t j = 0; j < n; ++j) {  // acc += P V
      for (int64_t r = 0; r < rows; ++r) {
        const T p = S[r * kRun + j];
        if (p != T(0)) axpy(acc + r * D, p, v + j * ldv, D);
      }
    }
    j0 += n;
  }
}

// The q rows of (b, hk), times scale, in T: w.q (rows, D).
template <typename In, typename T>
void load_queries(const Problem& s, const at::Tensor& q, int64_t b, int64_t hk, T scale,
                  Scratch<T>& w) {
  const In* qp = q.data_ptr<In>();
  for (int64_t r = 0; r < s.rows(); ++r) {
    const int64_t i = r / s.group(), h = hk * s.group() + r % s.group();
    T* dst = w.q.data() + r * s.D;
    widen<In, T>(qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), dst, s.D);
    scale_row(dst, s.D, scale);
  }
}

// Splits of every (sequence, kv head), about kTasksPerThread per thread in all, longest first.
std::vector<Task> plan(const Problem& s, const int32_t* lens) {
  int64_t total = 0;
  for (int64_t b = 0; b < s.B; ++b) total += lens[b];
  const int64_t want = kTasksPerThread * at::get_num_threads();
  const int64_t chunk = ceil_div(std::max(kMinChunk, ceil_div(total * s.Hkv, want)), kRun) * kRun;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t first = s.key_lo(lens[b], 0);  // a window skips the keys before it: O(W)
    for (int64_t hk = 0; hk < s.Hkv; ++hk) {
      for (int64_t lo = first; lo < lens[b]; lo += chunk)
        tasks.push_back({b, hk, lo, std::min<int64_t>(lo + chunk, lens[b])});
    }
  }
  return tasks;
}

// Runs task(t) for t in order, each thread claiming the next unclaimed one.
template <typename Make, typename Fn>
void claim_each(const std::vector<int64_t>& order, const Make& make, const Fn& task) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make();
    for (int64_t i = next++; i < n; i = next++) task(state, order[i]);
  });
}

// out[b, i, h] for the rows of (b, hk) from its partials [t0, t1) (none: zeros); sinks (H,) or
// nullptr: exp(sinks[h]) joins each denominator.
template <typename T>
void merge(const Problem& s, int64_t b, int64_t hk, int64_t t0, int64_t t1, const T* acc,
           const T* m, const T* l, const T* sinks, T* out) {
  const int64_t D = s.D, rows = s.rows();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / s.group(), h = hk * s.group() + r % s.group();
    T* o = out + ((b * s.Tq + i) * s.H + h) * D;
    std::fill(o, o + D, T(0));
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t t = t0; t < t1; ++t) mx = std::max(mx, m[t * rows + r]);
    if (sinks == nullptr && mx == -std::numeric_limits<T>::infinity()) continue;  // no key
    const T top = sinks == nullptr ? mx : std::max(mx, sinks[h]);
    T denom = sinks == nullptr ? T(0) : std::exp(sinks[h] - top);
    for (int64_t t = t0; t < t1; ++t) {
      const T mt = m[t * rows + r];
      if (mt == -std::numeric_limits<T>::infinity()) continue;
      const T wt = std::exp(mt - top);
      denom += wt * l[t * rows + r];
      axpy(o, wt, acc + (t * rows + r) * D, D);
    }
    scale_row(o, D, T(1) / denom);
  }
}

template <typename In, typename T>
void kvcache_kernel(const Problem& s, T scale, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const int32_t* lens, const int32_t* table,
                    const T* sinks, T* out) {
  const auto cache = [](const at::Tensor& c) {
    return Cache<In>{c.data_ptr<In>(), c.stride(0), c.stride(1), c.stride(2)};
  };
  const Cache<In> kc = cache(k_cache), vc = cache(v_cache);
  const std::vector<Task> tasks = plan(s, lens);
  const int64_t n = static_cast<int64_t>(tasks.size()), rows = s.rows();
  std::vector<T> acc(n * rows * s.D), m(n * rows), l(n * rows);
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return tasks[a].hi - tasks[a].lo > tasks[b].hi - tasks[b].lo;
  });
  struct State {
    Scratch<T> w;
    int64_t owner = -1;  // (b, hk) whose q rows are in w.q
  };
  claim_each(order, [&] { return State{Scratch<T>(s)}; }, [&](State& st, int64_t t) {
    const Task& task = tasks[t];
    if (task.b * s.Hkv + task.hk != st.owner) {
      load_queries<In, T>(s, q, task.b, task.hk, scale, st.w);
      st.owner = task.b * s.Hkv + task.hk;
    }
    fold_split<In, T>(s, kc, vc, table, lens[task.b], task, st.w, acc.data() + t * rows * s.D,
                      m.data() + t * rows, l.data() + t * rows);
  });
  // Tasks of one (b, hk) are consecutive in `tasks`: first[u] .. first[u + 1].
  std::vector<int64_t> first(s.B * s.Hkv + 1, n);
  for (int64_t t = n - 1; t >= 0; --t) first[tasks[t].b * s.Hkv + tasks[t].hk] = t;
  for (int64_t u = s.B * s.Hkv - 1; u >= 0; --u) first[u] = std::min(first[u], first[u + 1]);
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u)
      merge<T>(s, u / s.Hkv, u % s.Hkv, first[u], first[u + 1], acc.data(), m.data(), l.data(),
               sinks, out);
  });
}

// ---------------------------------------------------------------- checks

void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lens, const std::optional<at::Tensor>& table) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
                    "cpp_attention_kvcache expects q (B, Tq, H, D) and k_cache, v_cache of one "
                    "4-d shape, got q ", q.sizes(), ", k_cache ", k.sizes(), ", v_cache ",
                    v.sizes(), ".");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                       at::isFloatingType(q.scalar_type()),
                   "cpp_attention_kvcache expects q, k_cache, v_cache of one floating dtype, got ",
                   q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type(), ".");
  const int64_t B = q.size(0);
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && k.size(2) >= 1 && q.size(2) % k.size(2) == 0,
                    "cpp_attention_kvcache expects caches with q's head dim and a number of heads "
                    "dividing q's, got q ", q.sizes(), " and k_cache ", k.sizes(), ".");
  TORCH_CHECK_VALUE(lens.scalar_type() == at::kInt && lens.dim() == 1 && lens.size(0) == B,
                    "cpp_attention_kvcache expects seqlens_k of shape (", B, ",) int32, got ",
                    lens.sizes(), " ", lens.scalar_type(), ".");
  if (table) {
    TORCH_CHECK_VALUE(
        table->scalar_type() == at::kInt && table->dim() == 2 && table->size(0) == B,
        "cpp_attention_kvcache expects a block_table of shape (", B, ", max_blocks) int32, got ",
        table->sizes(), " ", table->scalar_type(), ".");
    TORCH_CHECK_VALUE(k.size(1) >= 1, "cpp_attention_kvcache expects pages of at least one row, "
                      "got k_cache ", k.sizes(), ".");
  } else {
    TORCH_CHECK_VALUE(k.size(0) == B, "cpp_attention_kvcache expects a dense cache (", B,
                      ", Tmax, Hkv, D) without a block_table, got k_cache ", k.sizes(), ".");
  }
  for (const auto* t : {&q, &k, &v, &lens})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "cpp_attention_kvcache expects CPU tensors, got ",
                      t->device(), ".");
}

// Each length within the cache and, paged, each page a sequence uses a valid block id.
void check_lengths(const Problem& s, const int32_t* lens, const int32_t* table, int64_t capacity,
                   int64_t num_blocks) {
  for (int64_t b = 0; b < s.B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= capacity, "cpp_attention_kvcache: seqlens_k[",
                      b, "] = ", lens[b], " is outside the cache's 0..", capacity, " keys.");
    if (!s.paged) continue;
    for (int64_t p = 0; p < ceil_div(lens[b], s.page_size); ++p) {
      const int32_t id = table[b * s.blocks_per_seq + p];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "cpp_attention_kvcache: block_table[", b,
                        ", ", p, "] = ", id, " is not a block of the ", num_blocks,
                        "-block cache.");
    }
  }
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::Tensor attention_kvcache_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                 const at::Tensor& seqlens_k,
                                 const std::optional<at::Tensor>& block_table, bool causal,
                                 double scale, at::OptionalIntArrayRef window, double softcap,
                                 const std::optional<at::Tensor>& sinks) {
  check_shapes(q_, k_, v_, seqlens_k, block_table);
  const auto ct = q_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Variants var = read_variants(window, softcap, sinks, q_.size(2), q_, ct);
  const auto q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  const auto lens = seqlens_k.contiguous();
  const bool paged = block_table.has_value();
  const auto table = paged ? block_table->contiguous() : at::Tensor();
  const Problem s{q.size(0), q.size(1), q.size(2), k.size(2),   q.size(3),  k.size(1),
                  paged ? table.size(1) : 0, paged, causal, var.left, var.right, var.softcap};
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = paged ? table.data_ptr<int32_t>() : nullptr;
  const int64_t capacity = paged ? s.blocks_per_seq * s.page_size : k.size(1);
  check_lengths(s, lp, tp, capacity, k.size(0));
  auto out = at::empty({s.B, s.Tq, s.H, s.D}, q.options().dtype(ct));  // (B, Tq, H, D)
  if (out.numel() == 0) return out.to(q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kvcache", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    kvcache_kernel<scalar_t, T>(s, static_cast<T>(scale), q, k, v, lp, tp, sinks_ptr<T>(var),
                                out.data_ptr<T>());
  });
  return out.to(q.scalar_type());
}

}  // namespace
}  // namespace fastgpt::cpu

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("cpp_attention_kvcache", &fastgpt::cpu::attention_kvcache_cpu);
}
