#include "runtime/engine/clock.h"

namespace dmsrt {

namespace {
class SteadyClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
};
}  // namespace

const Clock& RealClock() {
  static const SteadyClock* clock = new SteadyClock();
  return *clock;
}

}  // namespace dmsrt
