// Run-time choice of the instruction set: the best one this CPU (and its OS) can run.
#include <atomic>

#include "kernels.h"

namespace elastic {

namespace {

bool cpu_runs(const KernelTable* table) {
  if (table == nullptr) return false;
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string isa = table->isa;
  // libgcc's checks include the OS's support for saving the wider registers (XCR0).
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  }
#endif
  return true;
}

std::atomic<const KernelTable*> chosen{nullptr};

}  // namespace

std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> tables;
  for (const KernelTable* table : {kernel_table_avx512(), kernel_table_avx2(), kernel_table_generic()}) {
    if (cpu_runs(table)) tables.push_back(table);
  }
  return tables;
}

const KernelTable& active_table() {
  const KernelTable* table = chosen.load();
  if (table == nullptr) {
    table = supported_tables().front();
    chosen.store(table);
  }
  return *table;
}

void select_isa(const std::string& name) {
  std::string known;
  for (const KernelTable* table : supported_tables()) {
    if (name == table->isa) {
      chosen.store(table);
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(table->isa);
  }
  throw std::invalid_argument("unknown or unsupported instruction set '" + name + "'; this CPU runs: " + known);
}

}  // namespace elastic
