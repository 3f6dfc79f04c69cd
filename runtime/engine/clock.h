// The time source of the engine and the coordinator's admission code. The runtime reads the
// real monotonic clock; the capacity planner (launch/plan/) drives the same code with a simulated
// clock that advances by each step's predicted duration.
//
// Threading: RealClock is safe from any thread. A SimClock is advanced by the thread that drives
// the simulation, which is also the only thread that reads it.
#pragma once

#include <chrono>

namespace dmsrt {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
};

// std::chrono::steady_clock. One process-wide instance; never destroyed.
const Clock& RealClock();

// A clock that moves only when told to. Starts at the steady clock's epoch.
class SimClock final : public Clock {
 public:
  TimePoint Now() const override { return now_; }
  void Advance(std::chrono::nanoseconds d) { now_ += d; }
  void AdvanceSeconds(double s) {
    now_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(s));
  }
  // Moves to `t` when `t` is later; never backwards.
  void AdvanceTo(TimePoint t) {
    if (t > now_) now_ = t;
  }
  double Seconds() const { return std::chrono::duration<double>(now_.time_since_epoch()).count(); }

 private:
  TimePoint now_{};
};

}  // namespace dmsrt
