#include "ops/accurate_sum.h"

namespace fl {

mx::array accurate_sum(const mx::array& a, mx::StreamOrDevice s) {
  auto x = dense(mx::astype(a, mx::float32, s), s);
  return mx::array(mx::Shape{}, mx::float32,
                   std::make_shared<AccurateSum>(mx::to_stream(s), AccurateSumParams{}), {x});
}

std::vector<mx::Shape> AccurateSum::output_shapes(const std::vector<mx::array>&) {
  return {mx::Shape{}};
}

std::vector<mx::array> AccurateSum::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto s = stream();
  std::vector<mx::array> grads;
  for (size_t i = 0; i < argnums.size(); ++i) {
    grads.push_back(mx::multiply(mx::ones_like(primals[0], s),
                                 mx::astype(cotangents[0], mx::float32, s), s));
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> AccurateSum::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  auto x = axes[0] == 0 ? inputs[0] : mx::moveaxis(inputs[0], axes[0], 0, s);
  std::vector<int> rest = axes_from(x, 1);
  return {{rest.empty() ? x : mx::sum(x, rest, false, s)}, {0}};
}

#ifndef _METAL_
FL_NO_METAL(AccurateSum)
#endif

} // namespace fl
