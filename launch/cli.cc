#include "launch/cli.h"

#include <cmath>
#include <iostream>
#include <sstream>

#include <CLI/CLI.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "launch/byte_size.h"

namespace dmsrt {
namespace {

// Help lines as "--name TYPE   description (constraint; default: value)": CLI11's own layout
// glues the validator and the default to the type ("INT:>= 0=0"). CLI11 joins the type name and
// the validators' descriptions with ':', so a type name (Option::type_name) must not contain one.
class HelpFormatter : public CLI::Formatter {
 public:
  std::string make_option_opts(const CLI::Option* opt) const override {
    if (opt->get_type_size() == 0) return "";
    std::string out = " " + TypeOf(opt);
    if (opt->get_expected_max() == CLI::detail::expected_max_vector_size) out += " ...";
    if (opt->get_required()) out += " REQUIRED";
    return out;
  }

  std::string make_option_desc(const CLI::Option* opt) const override {
    std::string desc = opt->get_description();
    if (opt->get_type_size() == 0) return desc;
    std::vector<std::string> notes;
    const std::string type = opt->get_type_name();
    if (size_t colon = type.find(':'); colon != std::string::npos) {
      notes.push_back(type.substr(colon + 1));
    }
    const std::string def = opt->get_default_str();
    if (!def.empty() && def != "[]" && opt->get_expected_max() != CLI::detail::expected_max_vector_size) {
      notes.push_back("default: " + def);
    }
    if (!notes.empty()) desc += " (" + absl::StrJoin(notes, "; ") + ")";
    return desc;
  }

 private:
  static std::string TypeOf(const CLI::Option* opt) {
    const std::string type = opt->get_type_name();
    return type.substr(0, type.find(':'));
  }
};

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// "unknown option --max-token (did you mean --max-tokens?)" / "unexpected argument 'hello'".
std::string ExtrasMessage(const CLI::App& app) {
  const std::vector<std::string> extras = app.remaining();
  if (extras.empty()) return "unexpected arguments";
  for (const std::string& e : extras) {
    if (e.size() < 2 || e[0] != '-') continue;
    const std::string name = e.substr(0, e.find('='));
    std::string best;
    size_t best_d = 4;  // suggest only close spellings
    for (const CLI::Option* o : app.get_options()) {
      for (const std::string& l : o->get_lnames()) {
        const size_t d = EditDistance(name, "--" + l);
        if (d < best_d) best_d = d, best = "--" + l;
      }
    }
    return absl::StrCat("unknown option ", name, best.empty() ? "" : absl::StrCat(" (did you mean ", best, "?)"));
  }
  return absl::StrCat("unexpected argument '", extras[0], "' (options are spelt --name VALUE)");
}

}  // namespace

CommandLine::CommandLine(const std::vector<Subcommand>& subcommands)
    : app_(std::make_unique<CLI::App>(
          "dmsrt: LLM inference with KV-cache compression (DMS) on CPU or CUDA", "dmsrt")) {
  app_->formatter(std::make_shared<HelpFormatter>());
  app_->get_formatter()->column_width(32);
  // Inherited by every subcommand and option added below.
  app_->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)->always_capture_default();
  app_->footer("Run 'dmsrt <subcommand> --help' for the options of one subcommand.");
  for (const Subcommand& s : subcommands) {
    CLI::App* sub = app_->add_subcommand(s.name, s.description);
    runs_.emplace_back(sub, s.bind(*sub));
  }
}

CommandLine::~CommandLine() = default;

std::optional<int> CommandLine::Parse(int argc, const char* const* argv, std::ostream& out,
                                      std::ostream& err) {
  if (argc < 2) {
    err << Help();
    return 2;
  }
  const std::string first = argv[1];
  if (first == "help") {
    out << Help(argc > 2 ? argv[2] : "");
    return 0;
  }
  if (first[0] != '-') {
    bool known = false;
    for (const auto& r : runs_) known = known || r.first->get_name() == first;
    if (!known) {
      err << "dmsrt: unknown subcommand '" << first << "'\n\n" << Help();
      return 2;
    }
  }
  try {
    app_->parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    out << app_->help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    out << app_->help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::ParseError& e) {
    const std::vector<CLI::App*> chosen = app_->get_subcommands();
    const CLI::App& where = chosen.empty() ? *app_ : *chosen.front();
    const std::string who = chosen.empty() ? "dmsrt" : "dmsrt " + where.get_name();
    std::string message = e.what();
    if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr) {
      message = ExtrasMessage(where);
    } else if (dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr &&
               message.rfind("--", 0) == 0 && message.find(" missing") != std::string::npos) {
      message = message.substr(0, message.find(':')) + " needs a value";  // "--prompt: 1 required TEXT missing"
    }
    err << who << ": " << message << "\n"
        << "Run '" << who << " --help' for the options.\n";
    return 2;
  }
  if (app_->get_subcommands().empty()) {
    err << Help();
    return 2;
  }
  return std::nullopt;
}

int CommandLine::Run(ProcessArgs& args) {
  for (auto& [app, run] : runs_) {
    if (app->parsed()) return run(args);
  }
  std::cerr << Help();
  return 2;
}

std::string CommandLine::Help(const std::string& subcommand) const {
  if (subcommand.empty()) return app_->help();
  for (const auto& r : runs_) {
    if (r.first->get_name() == subcommand) return r.first->help("dmsrt");
  }
  return absl::StrCat("dmsrt: unknown subcommand '", subcommand, "'\n\n", app_->help());
}

int RunCommandLine(int argc, char** argv) {
  CommandLine cl;
  if (std::optional<int> done = cl.Parse(argc, argv, std::cout, std::cerr)) return *done;
  ProcessArgs args{argc, argv};
  return cl.Run(args);
}

// ---- validators ---------------------------------------------------------------------------------

namespace {

std::string BoundsText(const std::string& lo, const std::string& hi, bool lo_exclusive) {
  if (!lo.empty() && !hi.empty()) return absl::StrCat("in ", lo_exclusive ? "(" : "[", lo, ", ", hi, "]");
  if (!lo.empty()) return absl::StrCat(lo_exclusive ? "> " : ">= ", lo);
  if (!hi.empty()) return absl::StrCat("<= ", hi);
  return "";
}

std::string NumberText(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

CLI::Validator Integer(std::optional<int64_t> min, std::optional<int64_t> max) {
  const std::string bounds = BoundsText(min ? absl::StrCat(*min) : "", max ? absl::StrCat(*max) : "", false);
  // Rewrites the value in decimal: CLI11 would read "010" as octal.
  return CLI::Validator(
      [min, max, bounds](std::string& s) -> std::string {
        int64_t v = 0;
        if (!absl::SimpleAtoi(s, &v)) return absl::StrCat("expects an integer, got '", s, "'");
        if ((min && v < *min) || (max && v > *max)) return absl::StrCat("must be ", bounds, ", got ", s);
        s = absl::StrCat(v);
        return "";
      },
      bounds);
}

CLI::Validator Number(std::optional<double> min, std::optional<double> max, bool min_exclusive) {
  const std::string bounds =
      BoundsText(min ? NumberText(*min) : "", max ? NumberText(*max) : "", min_exclusive);
  return CLI::Validator(
      [min, max, min_exclusive, bounds](std::string& s) -> std::string {
        double v = 0;
        if (!absl::SimpleAtod(s, &v) || std::isnan(v)) return absl::StrCat("expects a number, got '", s, "'");
        const bool low = min && (min_exclusive ? v <= *min : v < *min);
        if (low || (max && v > *max)) return absl::StrCat("must be ", bounds, ", got ", s);
        return "";
      },
      bounds);
}

CLI::Validator OneOf(std::vector<std::string> values) {
  const std::string list = absl::StrJoin(values, ", ");
  return CLI::Validator(
      [values, list](std::string& s) -> std::string {
        for (const std::string& v : values) {
          if (absl::AsciiStrToLower(s) == absl::AsciiStrToLower(v)) {
            s = v;
            return "";
          }
        }
        return absl::StrCat("expects one of ", list, ", got '", s, "'");
      },
      "one of " + list);
}

namespace {

CLI::Validator ByteSizeValidator() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        absl::StatusOr<int64_t> bytes = ParseByteSize(s);
        if (!bytes.ok()) return std::string(bytes.status().message());
        s = absl::StrCat(*bytes);
        return "";
      },
      "");
}

constexpr char kByteSizeForms[] = " (bytes, or with a unit: 512MiB, 2GiB, 1.5GB)";

}  // namespace

CLI::Option* AddByteSizeOption(CLI::App& app, const std::string& name, int64_t* bytes,
                               const std::string& description, const std::string& default_text) {
  CLI::Option* o = app.add_option(name, *bytes, description + kByteSizeForms)
                       ->transform(ByteSizeValidator())
                       ->type_name("SIZE");
  o->default_str(default_text);
  return o;
}

CLI::Option* AddByteSizeOption(CLI::App& app, const std::string& name,
                               std::optional<int64_t>* bytes, const std::string& description) {
  CLI::Option* o = app.add_option(name, *bytes, description + kByteSizeForms)
                       ->transform(ByteSizeValidator())
                       ->type_name("SIZE");
  o->default_str("");
  return o;
}

}  // namespace dmsrt
