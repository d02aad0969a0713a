// The Jinja engine (src/data/jinja.h) on small templates, each expected string being what Python's
// jinja2 renders under transformers' settings (trim_blocks, lstrip_blocks, its tojson): whitespace
// control, loops and scoping, Python's operators and str(), filters, macros, undefined values,
// {% generation %} spans, and the errors and bounds that keep untrusted templates in check.
#include <gtest/gtest.h>

#include "src/core/error.h"
#include "src/data/jinja.h"
#include "tests/test_util.h"

namespace tf::data::jinja {
namespace {

using nlohmann::ordered_json;

#define EXPECT_CONTAINS(hay, needle) EXPECT_NE(std::string(hay).find(needle), std::string::npos) << (hay)

std::string R(std::string_view src, const ordered_json& ctx = ordered_json::object(), Limits limits = {}) {
  return Template(src, "t.jinja", limits).render(ctx, 0).text;
}

std::string E(std::string_view src, const ordered_json& ctx = ordered_json::object(), Limits limits = {}) {
  return test::error_of([&] { R(src, ctx, limits); });
}

TEST(DataJinja, WhitespaceControlAsTransformersSetsIt) {
  // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before one.
  EXPECT_EQ(R("  {% if true %}\nA\n  {% endif %}\nB"), "A\nB");
  EXPECT_EQ(R("x  {% if true %}y{% endif %}"), "x  y") << "lstrip only where the tag starts its line";
  EXPECT_EQ(R("{{ 'a' }}\n{{ 'b' }}"), "a\nb") << "variable tags keep their newline";
  EXPECT_EQ(R("  {{ 'a' }}"), "  a") << "variable tags are not lstripped";
  EXPECT_EQ(R("a  \n  {%- if true -%}  \n b {%- endif %}"), "ab");
  EXPECT_EQ(R("  {%+ if true %}x{% endif %}"), "  x") << "'+' keeps the indentation";
  EXPECT_EQ(R("{% if true +%}\nx{% endif %}"), "\nx") << "'+' keeps the newline";
  EXPECT_EQ(R("  {# note #}\nx"), "x") << "comments are trimmed like blocks";
  EXPECT_EQ(R("a\r\nb\n"), "a\nb") << "newlines normalised, one trailing newline dropped";
  EXPECT_EQ(R("a\n\n"), "a\n");
}

TEST(DataJinja, LoopsAndScoping) {
  const ordered_json ctx = {{"xs", {"a", "b", "c"}}};
  EXPECT_EQ(R("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.length }}"
              "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}{{ x }},{% endfor %}",
              ctx),
            "1033Fa,2123b,3213Lc,");
  EXPECT_EQ(R("{% for x in xs if x != 'a' %}{{ loop.index }}/{{ loop.length }}{% endfor %}", ctx), "1/22/2");
  EXPECT_EQ(R("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(R("{% for x in xs %}{% if x == 'b' %}{% continue %}{% endif %}{% if x == 'c' %}{% break %}"
              "{% endif %}{{ x }}{% endfor %}",
              ctx),
            "a");
  EXPECT_EQ(R("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"), "a=1;b=2;");
  EXPECT_EQ(R("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}"), "1")
      << "a set inside a loop stays in the loop";
  EXPECT_EQ(
      R("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}"),
      "4");
  EXPECT_EQ(R("{% if true %}{% set y = 3 %}{% endif %}{{ y }}"), "3") << "if has no scope";
  EXPECT_EQ(R("{% for c in 'hé' %}[{{ c }}]{% endfor %}{{ 'hé'|length }}"), "[h][é]2") << "code points";
}

TEST(DataJinja, PythonOperatorsAndStr) {
  EXPECT_EQ(
      R("{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 4 / 2 }}"),
      "7 3 -4 2 3.5 1024 2.0");
  EXPECT_EQ(R("{{ none }} {{ true }} {{ 1.0 }} {{ ['a', 1, none] }} {{ {'k': 'v'} }} {{ 1e20 }}"),
            "None True 1.0 ['a', 1, None] {'k': 'v'} 1e+20");
  EXPECT_EQ(R("{{ 'a' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [1] + [2] }}"), "a1None abab [1, 2]");
  EXPECT_EQ(R("{{ 1 < 2 < 3 }} {{ 'a' in 'cat' }} {{ 2 not in [1] }} {{ 'k' in {'k': 1} }} {{ 1 == 1.0 }}"),
            "True True True True True");
  EXPECT_EQ(R("{{ 'x' if false }}|{{ 'y' if 0 else 'z' }}|{{ 0 or 'd' }}|{{ 1 and 2 }}"), "|z|d|2");
  EXPECT_EQ(
      R("{{ 'abcdef'[1:3] }} {{ 'abc'[::-1] }} {{ [1, 2, 3][-1] }} {{ [1, 2, 3][1:] }} {{ 'héllo'[1] }}"),
      "bc cba 3 [2, 3] é");
  EXPECT_EQ(R("{{ '%s has %d items, %.2f%%' % ('x', 3, 1.5) }} {{ '{} and {name}'.format(1, name='n') }}"),
            "x has 3 items, 1.50% 1 and n");
  EXPECT_EQ(R("{{ not x is defined }} {{ x is not defined and true }}"), "True True");
}

// str.format's specs after ':' as Python's format(value, spec) writes them (each expected string
// printed by Python 3.11), and the specs Python refuses, refused with its reason.
TEST(DataJinja, StrFormatSpecsAreFormatsMiniLanguage) {
  const struct {
    const char* value;
    const char* spec;
    const char* want;
  } cases[] = {
      {"'abc'", ">6", "   abc"},
      {"'abc'", "*^7", "**abc**"},
      {"'abc'", ".2", "ab"},
      {"'h\u00e9llo'", "<7.3", "h\u00e9l    "},
      {"42", "05d", "00042"},
      {"42", "+d", "+42"},
      {"-42", "=+8", "-     42"},
      {"255", "#x", "0xff"},
      {"255", "X", "FF"},
      {"255", "#o", "0o377"},
      {"5", "b", "101"},
      {"1234567", ",", "1,234,567"},
      {"1234567", "_", "1_234_567"},
      {"65536", "_x", "1_0000"},
      {"97", "c", "a"},
      {"3.14159", ".2f", "3.14"},
      {"3.14159", "8.3f", "   3.142"},
      {"-3.14159", "08.3f", "-003.142"},
      {"2.5", "%", "250.000000%"},
      {"0.125", ".1%", "12.5%"},
      {"1234.5", ",.2f", "1,234.50"},
      {"1e-7", "g", "1e-07"},
      {"123456789.0", "g", "1.23457e+08"},
      {"1.0", ".3", "1.0"},
      {"1.5", "", "1.5"},
      {"0.1", "e", "1.000000e-01"},
      {"0.1", ".2E", "1.00E-01"},
      {"true", "", "True"},
      {"true", "d", "1"},
      {"true", ">6", "     1"},
      {"7", ".2f", "7.00"},
      {"12", "^6", "  12  "},
      {"12", " d", " 12"},
      {"1.5", ".0", "2e+00"},
      {"100.0", ".2", "1e+02"},
      {"2.0", "#g", "2.00000"},
      {"1234567.0", "n", "1.23457e+06"},
      {"1e16", "", "1e+16"},
      {"0.5", "<8", "0.5     "},
      {"-0.0", "f", "-0.000000"},
  };
  for (const auto& c : cases)
    EXPECT_EQ(R(std::string("{{ '{:") + c.spec + "}'.format(" + c.value + ") }}"), c.want)
        << c.value << " with '" << c.spec << "'";
  EXPECT_EQ(R("{{ '{0:>4}|{name:*<5}|{1!r:>6}'.format(7, 'q', name='n') }}"), "   7|n****|   'q'");
  EXPECT_CONTAINS(E("{{ '{:d}'.format('x') }}"), "unknown format code 'd' for a string");
  EXPECT_CONTAINS(E("{{ '{:+}'.format('x') }}"), "sign not allowed in string format specifier");
  EXPECT_CONTAINS(E("{{ '{:.2d}'.format(3) }}"), "precision not allowed in integer format specifier");
  EXPECT_CONTAINS(E("{{ '{:,x}'.format(3) }}"), "cannot specify ',' with 'x'");
  EXPECT_CONTAINS(E("{{ '{:>5}'.format(none) }}"), "a NoneType takes no format spec");
  EXPECT_CONTAINS(E("{{ '{:5q}'.format(3) }}"), "unknown format code 'q' for an integer");
  EXPECT_CONTAINS(E("{{ '{:5.2fx}'.format(3.0) }}"), "invalid format specifier");
  EXPECT_CONTAINS(E("{{ '{:99999}'.format(3) }}"), "a width or precision above 4096");
  EXPECT_CONTAINS(E("{{ '{!x}'.format(3) }}"), "a conversion is !s or !r");
}

// Casing and the str predicates follow Unicode as Python's do (utf8proc's simple case mappings),
// not ASCII alone: templates lower-case role names and titles in any script.
TEST(DataJinja, CasingAndPredicatesAreUnicode) {
  EXPECT_EQ(R("{{ '\u00e9lan'.upper() }} {{ '\u00c9COLE' | lower }} {{ '\u01c6emal \u01c6'.title() }} "
              "{{ '\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440'.title() }} {{ '\u01c6x' | "
              "capitalize }}"),
            "\u00c9LAN \u00e9cole \u01c5emal \u01c5 \u041f\u0440\u0438\u0432\u0435\u0442 \u041c\u0438\u0440 "
            "\u01c5x");
  EXPECT_EQ(R("{{ '\u00dcn\u00efcode'.isalpha() }} {{ '\u00c0B1'.isupper() }} {{ '\u00e0b'.islower() }} "
              "{{ '\u06634'.isdigit() }} {{ '\u3000 '.isspace() }} {{ 'x\u00b2'.isalnum() }} {{ "
              "'\u00c0B'.islower() }} "
              "{{ '12'.isupper() }}"),
            "True True True True True True False False");
}

TEST(DataJinja, StringAndDictMethods) {
  EXPECT_EQ(R("{{ '  a b  '.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ ' a'.lstrip() }}|{{ 'a '.rstrip() }}"),
            "a b|a|a|a");
  EXPECT_EQ(R("{{ ' a  b '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ "
              "'a,b,c'.rsplit(',', 1) }}"),
            "['a', 'b'] ['a', 'b', '', 'c'] ['a', 'b,c'] ['a,b', 'c']");
  EXPECT_EQ(R("{{ 'abc'.startswith(('x', 'a')) }} {{ 'abc'.endswith('bc') }} {{ 'hello world'.title() }} "
              "{{ 'aXb'.upper() }} {{ 'a-b-c'.replace('-', '+', 1) }}"),
            "True True Hello World AXB a+b-c");
  EXPECT_EQ(
      R("{{ d.get('a') }} {{ d.get('z') }} {{ d.get('z', 5) }} {{ d.keys() | list }} {{ d.values() | list }}",
        {{"d", {{"a", 1}, {"b", 2}}}}),
      "1 None 5 ['a', 'b'] [1, 2]");
  EXPECT_EQ(R("{{ d.items }}", {{"d", {{"items", 1}}}}).substr(0, 9), "<function")
      << "attributes win over keys";
  EXPECT_EQ(R("{{ d['items'] }}", {{"d", {{"items", 1}}}}), "1") << "for [] the key wins";
}

TEST(DataJinja, Filters) {
  const ordered_json ctx = {
      {"v", {{"name", "f"}, {"args", {{"x", 1}, {"y", {true, nullptr}}}}, {"s", "é\"\n"}}}};
  EXPECT_EQ(R("{{ v | tojson }}", ctx),
            "{\"name\": \"f\", \"args\": {\"x\": 1, \"y\": [true, null]}, \"s\": \"é\\\"\\n\"}");
  EXPECT_EQ(R("{{ v.args | tojson(indent=2) }}", ctx),
            "{\n  \"x\": 1,\n  \"y\": [\n    true,\n    null\n  ]\n}");
  EXPECT_EQ(R("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }} {{ [] | tojson }} {{ 1.5 | tojson }}"),
            "{\"a\": 2, \"b\": 1} [] 1.5");
  const ordered_json msgs = {
      {"m", {{{"role", "user"}, {"c", "A"}}, {{"role", "bot"}, {"c", "B"}}, {{"role", "user"}, {"c", "C"}}}}};
  EXPECT_EQ(R("{{ m | selectattr('role', 'equalto', 'user') | map(attribute='c') | join(',') }}", msgs),
            "A,C");
  EXPECT_EQ(R("{{ m | rejectattr('role', 'eq', 'user') | map(attribute='c') | list }}", msgs), "['B']");
  EXPECT_EQ(R("{{ m | map(attribute='c') | map('lower') | join }}", msgs), "abc");
  EXPECT_EQ(R("{{ [1, 0, 2] | select | list }} {{ [3, 1, 2] | sort | list }} {{ ['b', 'A', 'a'] | unique | "
              "list }}"),
            "[1, 2] [1, 2, 3] ['b', 'A']");
  EXPECT_EQ(R("{{ {'b': 1, 'A': 2} | dictsort }} {{ [1, 2] | reverse | list }} {{ [1, 2] | first }}{{ [1, 2] "
              "| last }}"),
            "[('A', 2), ('b', 1)] [2, 1] 12");
  EXPECT_EQ(R("{{ x | default('d') }} {{ '' | default('d', true) }} {{ ' a ' | trim }} {{ 'ab' | upper }} "
              "{{ 'aB' | capitalize }} {{ 'a b' | replace(' ', '_') }} {{ '3' | int + 1 }} {{ 'x' | int }} "
              "{{ '2.5' | float }}"),
            "d d a AB Ab a_b 4 0 2.5");
  EXPECT_EQ(R("{{ 'a\nb\n\nc' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}"), "a\n  b\n\n  c|  a\n  b");
  EXPECT_EQ(R("{{ -3 | abs }} {{ 2.567 | round(2) }} {{ 2.5 | round }} {{ [1, 2, 3] | length }} {{ {'a': 1} "
              "| count }}"),
            "3 2.57 3.0 3 1");
  EXPECT_EQ(R("{{ 'x' | safe + '<a>' }} {{ '<a>' + 'x' | safe }}"), "x&lt;a&gt; &lt;a&gt;x")
      << "markupsafe escapes a plain string added to Markup";
  EXPECT_CONTAINS(E("{{ [1] | map('string') | tojson }}"), "not JSON serializable")
      << "map returns a generator";
  EXPECT_CONTAINS(E("{{ [1] | select | length }}"), "has no len()");
}

TEST(DataJinja, UndefinedBehavesAsJinja2Default) {
  EXPECT_EQ(R("[{{ x }}]{{ x | length }}{% for i in x %}i{% endfor %}{{ x is defined }}{{ x ~ 'a' }}"),
            "[]0Falsea");
  EXPECT_EQ(R("{{ n.y is defined }} {{ d.missing is defined }} {{ l[5] is defined }}",
              {{"n", nullptr}, {"d", ordered_json::object()}, {"l", ordered_json::array()}}),
            "False False False");
  EXPECT_CONTAINS(E("{{ x.y }}"), "t.jinja:1:5: while rendering: 'x' is undefined");
  EXPECT_CONTAINS(E("{{ x + 1 }}"), "'x' is undefined");
  EXPECT_CONTAINS(E("{{ x() }}"), "'x' is undefined");
}

TEST(DataJinja, MacrosAndCall) {
  EXPECT_EQ(
      R("{% macro f(a, b='B') %}<{{ a }}{{ b }}>{% endmacro %}{{ f(1) }}{{ f(1, 2) }}{{ f(b=3, a=4) }}"),
      "<1B><12><43>");
  EXPECT_EQ(R("{% set g = 'G' %}{% macro f() %}{{ g }}{% endmacro %}{{ f() }}"), "G")
      << "top-level names are visible";
  EXPECT_EQ(R("{% macro w() %}[{{ caller() }}]{% endmacro %}{% call w() %}in{% endcall %}"), "[in]");
  // Macros and call blocks close over the scopes they are defined in, late-bound, as jinja2's do
  // (each expected string is jinja2's output).
  EXPECT_EQ(R("{% for i in [1, 2] %}{% macro m() %}[{{ i }}{{ g }}]{% endmacro %}{% set g = 7 %}{{ m() }}"
              "{% endfor %}",
              {{"g", 1}}),
            "[17][27]");
  EXPECT_EQ(R("{% macro m() %}<{{ caller() }}>{% endmacro %}{% for x in [1, 2] %}{% call m() %}{{ x }}"
              "{% endcall %}{% endfor %}"),
            "<1><2>");
  EXPECT_EQ(R("{% macro outer() %}{% set z = 3 %}{% macro inner() %}{{ z }}{% endmacro %}{{ inner() }}"
              "{% endmacro %}{{ outer() }}"),
            "3");
  EXPECT_EQ(R("{% set ns = namespace(c=0) %}{% for i in [1, 2] %}{% macro m() %}{% set ns.c = ns.c + i %}"
              "{% endmacro %}{{ m() }}{% endfor %}{{ ns.c }}"),
            "3");
  EXPECT_EQ(R("{% for i in [1] %}{% macro m() %}{{ i }}{% endmacro %}{% endfor %}{{ m is defined }}"),
            "False")
      << "a macro defined in a loop is the loop's variable";
  EXPECT_EQ(R("{% set t %}a{{ 1 }}{% endset %}{{ t }}|{% filter upper %}x{% endfilter %}"), "a1|X");
  EXPECT_CONTAINS(E("{% macro f(a) %}{% endmacro %}{{ f(1, 2) }}"), "takes 1 arguments, got 2");
}

TEST(DataJinja, GlobalsOfTransformers) {
  EXPECT_CONTAINS(E("{{ raise_exception('Roles must alternate') }}"),
                  "t.jinja:1:4: while rendering: the template raised an error: Roles must alternate");
  // 2024-06-15 12:00 UTC: the same local date within 11 hours of UTC.
  EXPECT_EQ(Template("{{ strftime_now('%Y-%m-%d') }}", "t").render(ordered_json::object(), 1718452800).text,
            "2024-06-15");
  EXPECT_EQ(R("{{ range(3) | list }} {{ range(1, 7, 2) | list }} {{ dict(a=1) }}"),
            "[0, 1, 2] [1, 3, 5] {'a': 1}");
  EXPECT_CONTAINS(E("{{ [1].append(2) }}"), "immutable sandbox");
  EXPECT_CONTAINS(E("{% set ns = namespace() %}{% set ns._x = 1 %}"), "starting with '_'");
}

TEST(DataJinja, GenerationBlocksMarkSpans) {
  const Template t(
      "A{% generation %}bc{% endgeneration %}d{% for i in [1, 2] %}{% generation %}{{ i }}{% endgeneration "
      "%}{% endfor %}",
      "t");
  EXPECT_TRUE(t.has_generation_blocks());
  const Rendered r = t.render(ordered_json::object(), 0);
  EXPECT_EQ(r.text, "Abcd12");
  EXPECT_EQ(r.generation, (std::vector<Span>{{1, 3}, {4, 5}, {5, 6}}));
  EXPECT_FALSE(Template("x", "t").has_generation_blocks());
}

TEST(DataJinja, ErrorsNameTheSourceAndTheConstruct) {
  EXPECT_CONTAINS(E("a\n  {% include 'x.jinja' %}"), "t.jinja:2:3: unsupported construct: {% include %}");
  EXPECT_CONTAINS(E("{% for x in y recursive %}{% endfor %}"), "unsupported construct: recursive for loops");
  EXPECT_CONTAINS(E("{{ x | wordwrap }}"), "t.jinja:1:8: unsupported filter 'wordwrap'");
  EXPECT_CONTAINS(E("{{ x is escaped }}"), "unsupported test 'escaped'");
  EXPECT_EQ(R("{% if false %}{{ x | from_json }}{% endif %}ok"), "ok")
      << "inside an if, only a run refuses it";
  EXPECT_CONTAINS(E("{% if true %}{{ x | from_json }}{% endif %}"), "unsupported filter 'from_json'");
  EXPECT_CONTAINS(E("{% if x %}a"), "the template ends inside a block: expected {% elif %}");
  EXPECT_CONTAINS(E("{{ 'abc }}"), "a string literal is never closed");
  EXPECT_CONTAINS(E("{{ (1 }}"), "t.jinja:1:7: unexpected '}', expected ')'");
  EXPECT_CONTAINS(E("{# x"), "a comment {# is never closed");
  EXPECT_CONTAINS(E("{{ 1 + }}"), "expected an expression, found '}}'");
  EXPECT_CONTAINS(E("{{ f(a=1, 2) }}", {{"f", 1}}), "a positional argument follows a keyword argument");
  EXPECT_CONTAINS(E("{{ 1 // 0 }}"), "integer division or modulo by zero");
  EXPECT_CONTAINS(E("{{ 9223372036854775807 + 1 }}"), "integer overflow");
  EXPECT_CONTAINS(E("{{ 'a' < 1 }}"), "'<' is not supported between 'str' and 'int'");
}

TEST(DataJinja, BoundsHoldOnHostileTemplates) {
  Limits small;
  small.max_output_bytes = 1000;
  small.max_iterations = 50;
  small.max_depth = 16;
  small.max_source_bytes = 100;
  EXPECT_CONTAINS(E("{% for i in range(100) %}{% endfor %}", ordered_json::object(), small),
                  "more than the limit of 50 iterations");
  EXPECT_CONTAINS(E("{% for i in range(40) %}{{ 'x' * 40 }}{% endfor %}", ordered_json::object(), small),
                  "grows past the limit of 1000 bytes");
  EXPECT_CONTAINS(E("{{ 'x' * 100000000000 }}", ordered_json::object(), small), "grows past the limit");
  EXPECT_CONTAINS(
      E("{{ " + std::string(20, '(') + "1" + std::string(20, ')') + " }}", ordered_json::object(), small),
      "nest deeper than the limit");
  EXPECT_CONTAINS(E("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ordered_json::object(), small),
                  "macro calls nest deeper than the limit of 16");
  EXPECT_CONTAINS(E(std::string(101, 'x'), ordered_json::object(), small), "more than the limit of 100");
  EXPECT_CONTAINS(E("{{ range(200000) | length }}"), "range() is limited to 100000 items");
}

}  // namespace
}  // namespace tf::data::jinja
